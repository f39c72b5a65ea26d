"""Small helpers shared by the rules."""

from torch import Tensor, nn

from jacext.errors import JacextError


def require_batch_dim(module: nn.Module, x: Tensor, min_dim: int) -> None:
    """Raise a clear error if ``x`` has no leading batch dimension."""
    if x.dim() < min_dim:
        raise JacextError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)} without a batch "
            f"dimension; per-sample quantities need inputs of shape (N, ...) with at least "
            f"{min_dim} dimensions. Add one with x.unsqueeze(0)."
        )


def spatial_letters(d: int) -> str:
    """Einsum letters for ``d`` spatial dimensions."""
    return "xyz"[:d]


def kernel_letters(d: int) -> str:
    """Einsum letters for ``d`` kernel dimensions."""
    return "abc"[:d]


def patches(x: Tensor, kernel_size, stride, dilation) -> Tensor:
    """Sliding windows of the last ``len(kernel_size)`` dims of ``x`` as a strided view.

    ``x`` of shape ``(..., L_1, ..., L_d)`` becomes ``(..., O_1, ..., O_d, K_1, ..., K_d)``
    with ``out[..., o, k] = x[..., o * stride + k * dilation]`` (no copy).
    """
    d = len(kernel_size)
    first = x.dim() - d
    for j, (k, s, dil) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(first + j, dil * (k - 1) + 1, s)[..., ::dil]
    return x
