"""jacext: per-sample Jacobians and gradients for PyTorch networks, as BackPACK extensions."""

from jacext import dp, natural_gradient, optim
from jacext.errors import JacextError
from jacext.extend import backward_plan, extend, unextend
from jacext.extensions import BatchGrad, BatchJacobian, BatchL2Grad
from jacext.functional import jacobian
from jacext.ntk import ntk, ntk_vp

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
    "natural_gradient",
    "dp",
    "optim",
    "JacextError",
]
__version__ = "0.1.0"
