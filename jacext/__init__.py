"""jacext: per-sample Jacobians and gradients for PyTorch networks, as BackPACK extensions."""

from jacext.errors import JacextError
from jacext.extend import extend, unextend
from jacext.extensions import BatchGrad, BatchJacobian, BatchL2Grad
from jacext.functional import jacobian

__all__ = ["extend", "unextend", "BatchJacobian", "BatchGrad", "BatchL2Grad", "jacobian", "JacextError"]
__version__ = "0.1.0"
