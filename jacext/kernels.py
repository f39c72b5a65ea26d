"""The empirical neural tangent kernel (NTK) of a model, from jacext's per-sample Jacobians.

For a model F(x; theta) with C = prod(out.shape[1:]) outputs per sample and per-sample
Jacobian J(x) = dF(x)/dtheta of shape (C, P), the empirical NTK is

    K(x, x')[c, d] = sum_p J(x)[c, p] J(x')[d, p],    i.e.  K(x, x') = J(x) J(x')^T.

It is a sum over parameter tensors, K = sum_k J_k(x) J_k(x')^T, so ``ntk`` contracts one
parameter's Jacobian block at a time (a matrix product over that parameter's entries) and never
concatenates them into one (N, C, P) matrix. Every c and d is kept: the kernel of
``out.sum(1)`` (summing the logits first) is sum_{c,d} K[c, d], a different quantity.

Modes (N1, N2 samples):

- ``"full"``: K of shape (N1, N2, C, C); (N1, N2) for a model with one scalar output per
  sample (out of shape (N,));
- ``"trace"``: sum_c K[:, :, c, c], shape (N1, N2);
- ``"diagonal"``: K[:, :, c, c], shape (N1, N2, C); (N1, N2) for a scalar output.

Data too large for one batch are processed block-wise: one Jacobian computation (one
forward and one backward pass, ``jacext.jacobian``) per batch and block of the kernel, at
most two batches' Jacobians alive at a time.
"""

from collections.abc import Iterator
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.data import DataLoader, RandomSampler

from jacext.engine.apply import apply_rule
from jacext.engine.meets import Meet
from jacext.engine.plan import PullBack
from jacext.extending import recorded
from jacext.extensions import BatchJacobian

MODES = ("full", "trace", "diagonal")

# Kernel blocks are computed in the layout of jacext's Jacobians, outputs first (C, N, P):
# full (C, Na, C, Nb), trace (Na, Nb), diagonal (C, Na, Nb); these permutations give the
# returned layouts (Na, Nb, C, C), (Na, Nb), (Na, Nb, C).
_TO_RETURNED = {"full": (1, 3, 0, 2), "trace": (0, 1), "diagonal": (1, 2, 0)}
# K(x', x) from K(x, x'), returned layouts: swap the samples, and the outputs where both are kept.
_SWAPS = {"full": (1, 0, 3, 2), "trace": (1, 0), "diagonal": (1, 0, 2)}
_TOTAL = "total"  # the key of the summed kernel in a block's dictionary

Inputs = Union[Tensor, tuple, Iterable]  # one batch (a tensor, a tuple of arguments) or batches
Kernel = Union[Tensor, Dict[str, Tensor]]
Blocks = Dict[str, Tensor]  # one block of the kernel (or of every parameter's kernel), by name
Batches = Callable[[], Iterator]


def ntk(
    model: nn.Module,
    x1: Inputs,
    x2: Optional[Inputs] = None,
    *,
    mode: str = "full",
    per_layer: bool = False,
    batch_size: Optional[int] = None,
) -> Kernel:
    """The empirical NTK ``K(x1, x2) = J(x1) J(x2)^T`` of ``model``'s output.

    Args:
        model: the network; its output has the batch as first dimension. Put it in eval
            mode (dropout, batch statistics) for a deterministic kernel.
        x1: the inputs of the kernel's rows: a tensor, or a tuple of the model's positional
            arguments, or a re-iterable of such batches (a ``DataLoader`` without
            shuffling, a list), which is computed block-wise.
        x2: the inputs of its columns, in the same forms; ``None`` means ``x2 = x1`` and
            uses the symmetry K(x', x) = K(x, x')^T: each off-diagonal block is computed once.
        mode: ``"full"``, ``"trace"`` or ``"diagonal"`` (module docstring for the shapes).
        per_layer: return ``{parameter name: its contribution J_k J_k^T}`` (trainable
            parameters, ``model.named_parameters()`` order); their sum is the kernel.
        batch_size: split tensor inputs into batches of this many samples.

    Blocks: for every batch a of x1, its Jacobian is computed once and contracted with the
    Jacobian of every batch b of x2 (b >= a when ``x2`` is None), computed for that block.
    ``model`` need not be extended; ``p.grad`` and the parameters' attributes are untouched.

    Returns:
        The kernel, of shape (N1, N2, C, C) for ``"full"``, (N1, N2) for ``"trace"``,
        (N1, N2, C) for ``"diagonal"`` (without the C dimensions for an output of shape (N,));
        with ``per_layer``, a dictionary of such kernels.

    Raises:
        ValueError: an unknown ``mode``; ``batch_size`` with an iterable of batches; a
            shuffling ``DataLoader``; no batch at all.
        TypeError: an iterator or generator of batches (it cannot be passed over twice).

    Example:
        >>> import torch, jacext
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x1, x2 = torch.randn(5, 3), torch.randn(6, 3)
        >>> jacext.ntk(model, x1, x2).shape
        torch.Size([5, 6, 2, 2])
        >>> jacext.ntk(model, x1, mode="trace").shape
        torch.Size([5, 5])
        >>> per_layer = jacext.ntk(model, x1, mode="diagonal", per_layer=True)
        >>> {name: tuple(k.shape) for name, k in per_layer.items()}
        {'0.weight': (5, 5, 2), '0.bias': (5, 5, 2), '2.weight': (5, 5, 2), '2.bias': (5, 5, 2)}
        >>> torch.allclose(sum(per_layer.values()), jacext.ntk(model, x1, mode="diagonal"))
        True
        >>> torch.allclose(jacext.ntk(model, x1, batch_size=2), jacext.ntk(model, x1))
        True
    """
    kernels = _kernels(model, x1, x2, mode, per_layer, batch_size)
    return kernels if per_layer else kernels[_TOTAL]


def ntk_vp(model: nn.Module, x1: Union[Tensor, tuple], v: Tensor, x2: Union[Tensor, tuple, None] = None) -> Tensor:
    """The kernel-vector product ``K(x1, x2) v = J(x1) (J(x2)^T v)`` without forming K or J.

    ``v`` has the shape of ``model(x2)``, (N2, *out.shape[1:]); the result that of
    ``model(x1)``. ``u = J(x2)^T v`` is one backward pass (a vector-Jacobian product);
    ``J(x1) u`` is a Jacobian-vector product by double backward: ``g(w) = J(x1)^T w`` is
    linear in w, so its derivative with respect to w in the direction u is ``J(x1) u``.
    Costs about three backward passes; memory of an ordinary training step. Plain autograd:
    ``model`` need not be extended, and ``p.grad`` is untouched.

    Args:
        model: the network; its output has the batch as first dimension.
        x1: the inputs of the kernel's rows: a tensor or a tuple of positional arguments.
        v: the vector, of the shape of ``model(x2)``.
        x2: the inputs of its columns; ``None`` means ``x2 = x1``.

    Returns:
        ``K(x1, x2) v``, of the shape of ``model(x1)`` (zeros where no trainable parameter
        reaches the output).

    Example:
        >>> import torch, jacext
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x1, x2, v = torch.randn(5, 3), torch.randn(6, 3), torch.randn(6, 2)
        >>> kv = jacext.ntk_vp(model, x1, v, x2)
        >>> kv.shape
        torch.Size([5, 2])
        >>> torch.allclose(kv, torch.einsum("mncd,nd->mc", jacext.ntk(model, x1, x2), v), atol=1e-5)
        True
    """
    params = [p for p in model.parameters() if p.requires_grad]
    args1 = x1 if isinstance(x1, tuple) else (x1,)
    args2 = args1 if x2 is None else (x2 if isinstance(x2, tuple) else (x2,))
    with torch.enable_grad():
        out2 = model(*args2)
        u = torch.autograd.grad(out2, params, v, allow_unused=True)
        out1 = model(*args1)
        w = torch.zeros_like(out1, requires_grad=True)
        g = torch.autograd.grad(out1, params, w, create_graph=True, allow_unused=True)
        used = [(gi, ui) for gi, ui in zip(g, u, strict=True) if gi is not None and ui is not None]
        if not used:
            return torch.zeros_like(out1)
        (jv,) = torch.autograd.grad([gi for gi, _ in used], w, [ui for _, ui in used])
    return jv


def top_eigenvalues(
    model: nn.Module, x: Inputs, k: int, *, mode: str = "full", method: str = "auto", batch_size: Optional[int] = None
) -> Tensor:
    """The ``k`` largest eigenvalues of the NTK of ``x`` with itself, in descending order.

    ``mode="full"``: of the (N C, N C) matrix K[(a, c), (b, d)], whose nonzero eigenvalues
    are those of the empirical Fisher-like J^T J (P, P); ``mode="trace"``: of the (N, N)
    trace kernel. The kernel is formed with :func:`ntk` (``batch_size`` as there), then

    - ``method="eigvalsh"``: ``torch.linalg.eigvalsh`` of the whole kernel, exact,
      O(n^3) for n rows;
    - ``method="lobpcg"``: ``torch.lobpcg`` (largest=True), iterative, O(n^2 k) per
      iteration, converged to a residual of about sqrt(machine epsilon); needs n >= 3 k;
    - ``method="auto"``: lobpcg when n > 2048 and n >= 3 k, eigvalsh otherwise.

    Args:
        model: the network, as for :func:`ntk`.
        x: the inputs, in any form :func:`ntk` takes.
        k: how many eigenvalues, between 1 and the kernel's size (N C for ``"full"``, N for
            ``"trace"``).
        mode: ``"full"`` or ``"trace"``.
        method: ``"auto"``, ``"eigvalsh"`` or ``"lobpcg"``.
        batch_size: as for :func:`ntk`.

    Returns:
        The ``k`` eigenvalues (k,), largest first.

    Raises:
        ValueError: another ``mode`` or ``method``, ``k`` out of range, or lobpcg with fewer
            than 3 k rows.

    Example:
        >>> import torch
        >>> from jacext.kernels import top_eigenvalues
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> top = top_eigenvalues(model, torch.randn(5, 3), k=3)
        >>> top.shape, bool((top[:-1] >= top[1:]).all())
        (torch.Size([3]), True)
    """
    if mode not in ("full", "trace"):
        raise ValueError(f"mode must be 'full' or 'trace' (a square kernel), got {mode!r}")
    kernel = _kernels(model, x, None, mode, False, batch_size)[_TOTAL]
    if kernel.dim() == 4:
        n, c = kernel.shape[0], kernel.shape[2]
        kernel = kernel.permute(0, 2, 1, 3).reshape(n * c, n * c)
    rows = kernel.shape[0]
    if not 1 <= k <= rows:
        raise ValueError(f"k must be between 1 and the kernel's size {rows}, got {k}")
    if method == "auto":
        method = "lobpcg" if rows > 2048 and rows >= 3 * k else "eigvalsh"
    if method == "eigvalsh":
        return torch.linalg.eigvalsh(kernel).flip(0)[:k]
    if method == "lobpcg":
        if rows < 3 * k:
            raise ValueError(f"lobpcg needs at least 3 k = {3 * k} rows; the kernel has {rows}: use eigvalsh")
        start = torch.randn(rows, k, generator=torch.Generator().manual_seed(0), dtype=kernel.dtype).to(kernel.device)
        values, _ = torch.lobpcg(kernel, k=k, X=start, largest=True)
        return values.sort(descending=True).values
    raise ValueError(f"method must be 'auto', 'eigvalsh' or 'lobpcg', got {method!r}")


def _kernels(model: nn.Module, x1: Inputs, x2: Optional[Inputs], mode: str, per_layer: bool, batch_size) -> Blocks:
    """``ntk``'s work: ``{name: kernel}`` per parameter with ``per_layer``, else ``{_TOTAL: kernel}``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    symmetric = x2 is None
    batches1 = _batches(x1, batch_size)
    batches2 = batches1 if symmetric else _batches(x2, batch_size)
    rows: List[List[Blocks]] = []
    scalar_output = False
    for a, xa in enumerate(batches1()):
        ja, scalar_output = _jacobian_blocks(model, xa)
        row: List[Blocks] = []
        for b, xb in enumerate(batches2()):
            if symmetric and b < a:
                row.append({name: k.permute(_SWAPS[mode]) for name, k in rows[b][a].items()})  # K(b, a) swapped
            elif symmetric and b == a:
                row.append(_contract(ja, ja, mode, per_layer))
            else:
                row.append(_contract(ja, _jacobian_blocks(model, xb)[0], mode, per_layer))
        if rows and len(row) != len(rows[0]):
            raise ValueError("x2 (or x1) gave a different number of batches on another pass over it")
        rows.append(row)
    if not rows:
        raise ValueError("x1 holds no batch")
    kernels = {name: torch.cat([torch.cat([blk[name] for blk in row], dim=1) for row in rows]) for name in rows[0][0]}
    if scalar_output and mode != "trace":
        kernels = {name: k.reshape(k.shape[:2]) for name, k in kernels.items()}
    return kernels


def _batches(x, batch_size: Optional[int]) -> Batches:
    """A function that starts a new pass over the batches of ``x``, each a tuple of arguments."""
    if isinstance(x, (Tensor, tuple)):
        args = x if isinstance(x, tuple) else (x,)
        chunks = [args] if batch_size is None else list(zip(*(a.split(batch_size) for a in args), strict=True))
        return lambda: iter(chunks)
    if batch_size is not None:
        raise ValueError("batch_size splits tensor inputs; an iterable of batches brings its own")
    if isinstance(x, Iterator):
        raise TypeError(
            "the kernel is computed block-wise in several passes over the batches: pass a "
            "re-iterable (a DataLoader, a list), not an iterator or generator"
        )
    if isinstance(x, DataLoader) and isinstance(x.sampler, RandomSampler):
        raise ValueError("the kernel's rows follow the DataLoader's order: use shuffle=False")
    return lambda: (tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in x)


def _jacobian_blocks(model: nn.Module, args: Tuple) -> Tuple[Blocks, bool]:
    """``{name: factor}`` for one batch, and whether the output is (n,).

    A factor is either a dense Jacobian block (C, n, P_k), outputs first as jacext stores it,
    or, for the weight of a Linear layer used once, the pair (X, G) with X (n, T, in) its input
    and G (C, n, T, out) the output's cotangents: its Jacobian J[c, n] = sum_t G[c, n, t]^T X[n, t]
    is never built (``_linear_block`` contracts X and G directly)."""
    with recorded(model, BatchJacobian(), args) as (out, tape):
        _, per_record = PullBack(tape, out.shape, out.detach()).cotangents(get_gradient_edge(out))
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    shared = tape.shared_parameters()
    n, c = out.shape[0], out.shape[1:].numel()
    blocks: Dict[str, Any] = {}
    for rec, grads in per_record:
        if isinstance(rec, Meet):  # a batch-free tensor meeting the batch: dense blocks per parameter
            for p, block in rec.per_sample(grads, n).items():
                name, dense_block = names[id(p)], block.reshape(n, c, -1).transpose(0, 1)
                blocks[name] = dense_block if name not in blocks else _dense(blocks[name]) + dense_block
            continue
        module = rec.module
        factors = rec.layer.ntk_factors
        if factors is not None and not (shared & rec.parameters) and not tape.coupled:
            per_name = factors(module, rec.args, grads, n)
        else:
            dense = apply_rule(rec, grads).items()
            per_name = {pname: block.reshape(n, c, -1).transpose(0, 1) for pname, block in dense}
        for pname, factor in per_name.items():  # dense blocks (C, n, P) or pairs (X, G)
            name = names[id(module.get_parameter(pname))]
            blocks[name] = factor if name not in blocks else _dense(blocks[name]) + _dense(factor)
    for name, p in model.named_parameters():  # parameters the forward pass did not use
        if p.requires_grad and name not in blocks:
            blocks[name] = out.new_zeros(c, n, p.numel())
    return {name: blocks[name] for name in names.values()}, out.dim() == 1


def _dense(factor) -> Tensor:
    """The Jacobian block (C, n, P) of a factor."""
    if isinstance(factor, Tensor):
        return factor
    x, g = factor
    return torch.einsum("cnto,nti->cnoi", g, x).flatten(2)


def _contract(ja: Blocks, jb: Blocks, mode: str, per_layer: bool) -> Blocks:
    """Kernel block J(batch a) J(batch b)^T in the mode's layout, contracted one parameter at a
    time: ``{name: J_k J_k^T}`` with ``per_layer``, else their sum as ``{_TOTAL: K}``."""
    parts: Blocks = {}
    for name in ja:
        a, b = ja[name], jb[name]
        if isinstance(a, tuple) and isinstance(b, tuple):
            part = _linear_block(a, b, mode)
        else:
            part = _parameter_block(_dense(a), _dense(b), mode)
        if per_layer or _TOTAL not in parts:
            parts[name if per_layer else _TOTAL] = part
        else:
            parts[_TOTAL] += part
    return {name: part.permute(_TO_RETURNED[mode]) for name, part in parts.items()}


def _linear_block(a, b, mode: str) -> Tensor:
    """A Linear weight's block without its Jacobian (neural-tangents' structured derivatives):

        K[c, m, d, n] = sum_{t, s} (G_a[c, m, t] . G_b[d, n, s]) (X_a[m, t] . X_b[n, s]),

    a product of the Gram matrices of the cotangents and of the inputs; for one position
    (T = 1) simply (G_a G_b^T) * (X_a X_b^T)."""
    (xa, ga), (xb, gb) = a, b
    inputs = torch.einsum("mti,nsi->mtns", xa, xb)
    if mode == "full":
        return torch.einsum("cmto,dnso,mtns->cmdn", ga, gb, inputs)
    diagonal = torch.einsum("cmto,cnso,mtns->cmn", ga, gb, inputs)
    return diagonal.sum(0) if mode == "trace" else diagonal


def _parameter_block(a: Tensor, b: Tensor, mode: str) -> Tensor:
    """One parameter's block from a (C, Na, P) and b (C, Nb, P): full (C, Na, C, Nb) is one
    matrix product (C Na, P) (P, C Nb); diagonal (C, Na, Nb) a batched product over the
    outputs, trace (Na, Nb) its sum over the outputs. A complex parameter's J = d/da + i d/db
    (autograd's convention) counts as its real and imaginary parts: Re(J_a J_b^H)."""
    if b.is_complex():
        b = b.conj()
    if mode == "full":
        c, na, p = a.shape
        block = (a.reshape(c * na, p) @ b.reshape(-1, p).T).view(c, na, c, b.shape[1])
    else:
        block = torch.bmm(a, b.transpose(1, 2))
        block = block.sum(0) if mode == "trace" else block
    return block.real if block.is_complex() else block
