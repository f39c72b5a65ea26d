"""jacext: per-sample Jacobians and gradients for PyTorch networks, as BackPACK extensions."""

from jacext import natural_gradient
from jacext.errors import JacextError
from jacext.extend import extend, unextend
from jacext.extensions import BatchGrad, BatchJacobian, BatchL2Grad
from jacext.functional import jacobian
from jacext.ntk import ntk, ntk_vp

__all__ = [
    "extend",
    "unextend",
    "BatchJacobian",
    "BatchGrad",
    "BatchL2Grad",
    "jacobian",
    "ntk",
    "ntk_vp",
    "natural_gradient",
    "JacextError",
]
__version__ = "0.1.0"
