"""jacext: per-sample Jacobians and gradients for PyTorch networks, as BackPACK extensions."""

from jacext import dp, kernels, natural_gradient, optim
from jacext.errors import JacextError
from jacext.extending import backward_plan, extend, unextend
from jacext.extensions import BatchGrad, BatchJacobian, BatchL2Grad
from jacext.functional import jacobian
from jacext.kernels import ntk, ntk_vp, top_eigenvalues

__all__ = [
    "extend",
    "unextend",
    "backward_plan",
    "BatchJacobian",
    "BatchGrad",
    "BatchL2Grad",
    "jacobian",
    "ntk",
    "ntk_vp",
    "top_eigenvalues",
    "kernels",
    "natural_gradient",
    "dp",
    "optim",
    "JacextError",
]
__version__ = "0.1.0"
