"""The peers: other ways to get the same per-sample gradients, Jacobians, norms or NTKs.

Each setup imports its library itself, so a missing optional peer (Opacus,
nngeometry) only makes its own rows "n/a". Gradient-only peers (ExpandedWeights,
Opacus) compute a Jacobian the way a user of theirs would: one forward and
backward pass per output, taking the per-sample gradients of ``out[:, c].sum()``.
Per-sample norms: the naive loop and ``vmap(grad)`` take the norms of the
per-sample gradients; Opacus's ghost clipping and BackPACK's ``BatchL2Grad`` compute
them without (for the layers they have norm rules for). The NTK: torch.func's
"Jacobian contraction" (from its NTK tutorial) and nngeometry's ``GramMatrix``. The DP step
(clipped sum in ``p.grad``, no noise): the naive loop, Opacus's ``DPOptimizer`` clipping the
per-sample gradients of ``GradSampleModule`` (hooks or functorch), and Opacus's ghost clipping.
"""

import copy
import math
from functools import partial
from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from benchmarks.methods import (
    CLIP_NORM,
    Method,
    Prepared,
    Unsupported,
    clear,
    collect,
    norms_from_squares,
    trainable,
)
from benchmarks.workloads import Case

OPTIONAL_PEERS = ["opacus", "nngeometry"]  # imported only by their methods; may be missing
MEMORY_LIMIT_GIB = 8.0  # on the CPU, a peer that would hold more than this is "n/a" instead of run
Objective = Callable[[Tensor], Tensor]  # model output -> scalar to differentiate


def _stack_rows(rows: Sequence[Sequence[Tensor]], dim: int = 0) -> List[Tensor]:
    """Rows of per-parameter tensors -> one stacked tensor per parameter."""
    return [torch.stack(per_param, dim) for per_param in zip(*rows, strict=True)]


def memory_limit_gib(device: torch.device) -> float:
    """What a peer may hold: :data:`MEMORY_LIMIT_GIB` on the CPU, half the memory of a CUDA device."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**31
    return MEMORY_LIMIT_GIB


def _outputs(case: Case) -> int:
    with torch.no_grad():
        return case.model(case.x[:1]).shape[1]


def _per_objective(case: Case, grads: Callable[[Objective], List[Tensor]]) -> Prepared:
    """A per-sample-gradient routine as a method: the loss's gradients, or C passes for a Jacobian."""
    if case.quantity == "grad":
        return Prepared(lambda: grads(partial(case.loss, target=case.y)))
    outputs = [partial(_output_sum, c=c) for c in range(_outputs(case))]
    return Prepared(lambda: _stack_rows([grads(output) for output in outputs], dim=1))


def _output_sum(out: Tensor, c: int) -> Tensor:
    return out[:, c].sum()


def _naive(case: Case) -> Prepared:
    """One autograd pass per sample (and per output for Jacobians)."""
    model = case.model
    params = [p for _, p in trainable(model)]
    n = case.x.shape[0]

    def grads() -> List[Tensor]:
        return _stack_rows(
            [torch.autograd.grad(case.loss(model(case.x[i : i + 1]), case.y[i : i + 1]), params) for i in range(n)]
        )

    def jacobians() -> List[Tensor]:
        rows = []
        for i in range(n):
            out = model(case.x[i : i + 1])[0]
            rows.append(_stack_rows([torch.autograd.grad(o, params, retain_graph=True) for o in out]))
        return _stack_rows(rows)

    def norms() -> List[Tensor]:
        squares = []
        for i in range(n):
            g = torch.autograd.grad(case.loss(model(case.x[i : i + 1]), case.y[i : i + 1]), params)
            squares.append(torch.stack([gi.square().sum() for gi in g]).sum())
        return [torch.stack(squares).sqrt()]

    def dp_step() -> List[Tensor]:
        total = [torch.zeros_like(p) for p in params]
        for i in range(n):
            g = torch.autograd.grad(case.loss(model(case.x[i : i + 1]), case.y[i : i + 1]), params)
            norm = torch.stack([gi.square().sum() for gi in g]).sum().sqrt()
            factor = (CLIP_NORM / (norm + 1e-6)).clamp(max=1.0)  # as jacext and Opacus clip
            for t, gi in zip(total, g, strict=True):
                t.add_(gi * factor)
        return total

    runs = {"grad": grads, "jacobian": jacobians, "norms": norms, "dp-step": dp_step}
    return Prepared(runs[case.quantity])


def _func_params(model: nn.Module):
    return {name: p.detach() for name, p in trainable(model)}


def _vmap_grad(case: Case) -> Prepared:
    from torch.func import functional_call, grad, vmap

    def loss_one(params, x, y):
        return case.loss(functional_call(case.model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    params = _func_params(case.model)
    return Prepared(lambda: per_sample(params, case.x, case.y), standard=lambda d: list(d.values()))


def _vmap_grad_norms(case: Case) -> Prepared:
    """vmap(grad), then the norms of the per-sample gradients (what a user of torch.func writes)."""
    per_sample = _vmap_grad(case).run

    def run() -> List[Tensor]:
        grads = per_sample()
        return [norms_from_squares([g.flatten(1).square().sum(1) for g in grads.values()])]

    return Prepared(run)


def _vmap_jacrev(case: Case) -> Prepared:
    from torch.func import functional_call, jacrev, vmap

    def out_one(params, x):
        return functional_call(case.model, params, (x.unsqueeze(0),)).squeeze(0)

    per_sample = vmap(jacrev(out_one), in_dims=(None, 0))
    params = _func_params(case.model)
    return Prepared(lambda: per_sample(params, case.x), standard=lambda d: list(d.values()))


def _expanded_weights(case: Case) -> Prepared:
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    model = copy.deepcopy(case.model)
    params = trainable(model)
    forward = call_for_per_sample_grads(model, batch_size=case.x.shape[0], loss_reduction="sum")

    def grads(objective: Objective) -> List[Tensor]:
        clear(params, "grad_sample")  # ExpandedWeights accumulates into an existing one
        objective(forward(case.x)).backward()
        return collect(params, "grad_sample", "ExpandedWeights")

    return _per_objective(case, grads)


def _opacus_ready(model: nn.Module) -> nn.Module:
    """A copy prepared as Opacus's documentation says, ``ModuleValidator.fix`` (nn.LSTM -> DPLSTM,
    BatchNorm -> GroupNorm, nn.MultiheadAttention -> DPMultiheadAttention, given the original's
    weights, which the fix draws afresh; nothing for the other workloads' layers)."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(copy.deepcopy(model))
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):  # its load_state_dict splits in_proj_weight and in_proj_bias
            fixed.get_submodule(name).load_state_dict(dict(m.state_dict()))
    return fixed


# nn.MultiheadAttention's stacked parameters, as DPMultiheadAttention's Linears hold them
DP_ATTENTION = {
    "in_proj_weight": ("qlinear.weight", "klinear.weight", "vlinear.weight"),
    "in_proj_bias": ("qlinear.bias", "klinear.bias", "vlinear.bias"),
}
Parts = List[Tuple[str, List[nn.Parameter]]]


def _same_order(model: nn.Module, fixed: nn.Module) -> Parts:
    """``fixed``'s parameters in ``model``'s order (DPLSTM keeps nn.LSTM's names, in another
    order); each with the parameters ``fixed`` holds it as (DPMultiheadAttention: three Linears
    for in_proj_weight)."""
    by_name = dict(trainable(fixed))
    order = []
    for name, _ in trainable(model):
        prefix, _, last = name.rpartition(".")
        parts = [f"{prefix}.{part}" if prefix else part for part in DP_ATTENTION.get(last, ())]
        order.append((name, [by_name[part] for part in parts] if name not in by_name else [by_name[name]]))
    return order


def _collect_parts(order: Parts, attr: str, who: str) -> List[Tensor]:
    """:func:`collect` of each parameter's parts, stacked along its rows (after the samples of ``grad_sample``)."""
    dim = 1 if attr == "grad_sample" else 0
    flat = collect([(name, p) for name, parts in order for p in parts], attr, who)
    values, i = [], 0
    for _, parts in order:
        values.append(flat[i] if len(parts) == 1 else torch.cat(flat[i : i + len(parts)], dim))
        i += len(parts)
    return values


def _opacus(case: Case) -> Prepared:
    from opacus import GradSampleModule

    fixed = _opacus_ready(case.model)
    module = GradSampleModule(fixed, loss_reduction="sum")
    params = _same_order(case.model, fixed)

    def grads(objective: Objective) -> List[Tensor]:
        module.zero_grad(set_to_none=True)  # clears grad_sample too
        objective(module(case.x)).backward()
        return _collect_parts(params, "grad_sample", "Opacus")

    return _per_objective(case, grads)


def _backpack_batch_grad(case: Case) -> Prepared:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model = extend(copy.deepcopy(case.model))
    params = trainable(model)

    def run() -> List[Tensor]:
        model.zero_grad(set_to_none=True)
        clear(params, "grad_batch")
        with backpack(BatchGrad()):
            case.loss(model(case.x), case.y).backward()
        return collect(params, "grad_batch", "BackPACK BatchGrad")

    return Prepared(run)


def _opacus_ghost_norms(case: Case) -> Prepared:
    """Opacus's ghost clipping module, first backward pass only: the per-sample norms
    (norm rules for Linear and Embedding; other layers' per-sample gradients, then their norms)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    module = GradSampleModuleFastGradientClipping(
        _opacus_ready(case.model), loss_reduction="sum", max_grad_norm=CLIP_NORM, use_ghost_clipping=True
    )

    def run() -> List[Tensor]:
        module.zero_grad(set_to_none=True)
        case.loss(module(case.x), case.y).backward()
        return [module.get_norm_sample()]

    return Prepared(run)


def _opacus_ghost_step(case: Case) -> Prepared:
    """Opacus's ghost clipping as documented for training: ``DPLossFastGradientClipping``'s
    ``backward`` runs a backward pass for the norms, then a second one of the loss reweighted by
    the clipping factors (``p.grad`` is the clipped sum; no noise: ``noise_multiplier=0``). Its
    result: the norms, or for ``"dp-step"`` the clipped sum."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    module = GradSampleModuleFastGradientClipping(
        _opacus_ready(case.model), loss_reduction="sum", max_grad_norm=CLIP_NORM, use_ghost_clipping=True
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(module.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=CLIP_NORM,
        expected_batch_size=case.x.shape[0],
        loss_reduction="sum",
    )
    criterion = DPLossFastGradientClipping(module, optimizer, copy.deepcopy(case.loss), loss_reduction="sum")

    def run() -> List[Tensor]:
        optimizer.zero_grad(set_to_none=True)
        criterion(module(case.x), case.y).backward()
        return [module.per_sample_gradient_norms]

    if case.quantity == "dp-step":
        params = _same_order(case.model, module._module)
        return Prepared(run, standard=lambda _: _collect_parts(params, "grad", "Opacus ghost clipping"), model=module)
    return Prepared(run, model=module)


def _opacus_dp_step(functorch: bool) -> Callable[[Case], Prepared]:
    """Opacus's DP step without noise: ``GradSampleModule``'s per-sample gradients (its hooks, or
    ``force_functorch``), clipped and summed into ``p.grad`` by ``DPOptimizer.pre_step``."""

    def setup(case: Case) -> Prepared:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        fixed = _opacus_ready(case.model)
        module = GradSampleModule(fixed, loss_reduction="sum", force_functorch=functorch)
        optimizer = DPOptimizer(
            torch.optim.SGD(module.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=CLIP_NORM,
            expected_batch_size=case.x.shape[0],
            loss_reduction="sum",
        )
        params = _same_order(case.model, fixed)

        def run() -> List[Tensor]:
            optimizer.zero_grad(set_to_none=True)  # clears grad_sample and summed_grad too
            case.loss(module(case.x), case.y).backward()
            optimizer.pre_step()
            return _collect_parts(params, "grad", "Opacus")

        return Prepared(run, model=module)

    return setup


def _backpack_batch_l2(case: Case) -> Prepared:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(copy.deepcopy(case.model))
    params = trainable(model)

    def run() -> List[Tensor]:
        model.zero_grad(set_to_none=True)
        clear(params, "batch_l2")
        with backpack(BatchL2Grad()):
            case.loss(model(case.x), case.y).backward()
        return [norms_from_squares(collect(params, "batch_l2", "BackPACK BatchL2Grad"))]

    return Prepared(run)


def _backpack_sqrt_ggn(case: Case) -> Prepared:
    """BackPACK's documented trick: SqrtGGNExact of ``MSELoss(sum)(out, 0)`` is sqrt(2) J, as (C, N, *p)."""
    from backpack import backpack, extend
    from backpack.extensions import SqrtGGNExact

    model = extend(copy.deepcopy(case.model))
    mse = extend(nn.MSELoss(reduction="sum"))
    params = trainable(model)

    def run() -> List[Tensor]:
        model.zero_grad(set_to_none=True)
        clear(params, "sqrt_ggn_exact")
        with backpack(SqrtGGNExact()):
            out = model(case.x)
            mse(out, torch.zeros_like(out)).backward()
        return [s.div(math.sqrt(2)).transpose(0, 1) for s in collect(params, "sqrt_ggn_exact", "BackPACK SqrtGGNExact")]

    return Prepared(run)


def _nngeometry(case: Case) -> Prepared:
    """nngeometry's Jacobian (V, N, P), one backward per output: of the per-sample loss (V=1) or of the model
    (a copy: nngeometry leaves its hooks on a model it fails on)."""
    from nngeometry import Jacobian
    from torch.utils.data import DataLoader, TensorDataset

    model = copy.deepcopy(case.model)
    loader = DataLoader(TensorDataset(case.x, case.y), batch_size=case.x.shape[0])
    if case.quantity == "grad":
        per_sample_loss = copy.copy(case.loss)
        setattr(per_sample_loss, "reduction", "none")  # noqa: B010 (a loss attribute, not a submodule)

        def function(x, y):
            return per_sample_loss(model(x), y)

    else:

        def function(x, y):
            return model(x)

    def standard(flat: Tensor) -> List[Tensor]:
        blocks, start = [], 0
        v, n = flat.shape[:2]
        for _, p in trainable(model):
            block = flat[:, :, start : start + p.numel()].transpose(0, 1).reshape(n, v, *p.shape)
            blocks.append(block[:, 0] if case.quantity == "grad" else block)
            start += p.numel()
        return blocks

    return Prepared(lambda: Jacobian(model=model, loader=loader, function=function).to_torch(), standard)


def _ntk_mode(case: Case) -> str:
    return case.quantity.split("-")[1]  # "ntk-full" -> "full"


def _torch_func_ntk(case: Case) -> Prepared:
    """torch.func's NTK tutorial, "Jacobian contraction": ``vmap(jacrev)`` per-sample Jacobians
    (computed once, as x1 = x2), then one einsum per parameter, summed."""
    from torch.func import functional_call, jacrev, vmap

    n, c = case.x.shape[0], _outputs(case)
    params = _func_params(case.model)
    jacobian_gib = n * c * sum(p.numel() for p in params.values()) * 4 / 2**30
    limit = memory_limit_gib(case.x.device)
    if jacobian_gib > limit:
        raise Unsupported(
            f"not run: its Jacobian (N x C x P floats) alone would take {jacobian_gib:.1f} GiB (> {limit:.0f} GiB)"
        )

    def out_one(params, x):
        return functional_call(case.model, params, (x.unsqueeze(0),)).squeeze(0)

    per_sample = vmap(jacrev(out_one), in_dims=(None, 0))
    expression = "Naf,Mbf->NMab" if _ntk_mode(case) == "full" else "Naf,Maf->NM"

    def run() -> List[Tensor]:
        jac = [j.flatten(2) for j in per_sample(params, case.x).values()]
        return [torch.stack([torch.einsum(expression, j, j) for j in jac]).sum(0)]

    return Prepared(run)


def _nngeometry_gram(case: Case) -> Prepared:
    """nngeometry's ``GramMatrix`` (C, N, C, N): C (C + 1) backward passes, per-layer Gram products
    in hooks; for the trace the full kernel is computed and traced (nngeometry has no trace-only path)."""
    from nngeometry import GramMatrix
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(case.x), batch_size=case.x.shape[0])
    full = _ntk_mode(case) == "full"

    def run() -> List[Tensor]:
        gram = GramMatrix(model=case.model, loader=loader).to_torch()  # (C, N, C, N)
        return [gram.permute(1, 3, 0, 2) if full else torch.einsum("cacb->ab", gram)]

    return Prepared(run)


def peers() -> List[Method]:
    grad, jac, both, norms = ("grad",), ("jacobian",), ("grad", "jacobian"), ("norms",)
    ntk, dp = ("ntk-full", "ntk-trace"), ("dp-step",)
    return [
        Method("naive per-sample loop", "peer", (*both, *norms, *dp), _naive, reference=True),
        Method("torch.func vmap(grad)", "peer", grad, _vmap_grad),
        Method("torch.func vmap(grad) + norms", "peer", norms, _vmap_grad_norms),
        Method("torch.func vmap(jacrev)", "peer", jac, _vmap_jacrev),
        Method("torch ExpandedWeights", "peer", grad, _expanded_weights),
        Method("torch ExpandedWeights (C passes)", "peer", jac, _expanded_weights),
        Method("Opacus GradSampleModule", "peer", grad, _opacus, needs="opacus"),
        Method("Opacus GradSampleModule (C passes)", "peer", jac, _opacus, needs="opacus"),
        Method("BackPACK BatchGrad", "peer", grad, _backpack_batch_grad),
        Method("BackPACK SqrtGGNExact (MSE trick)", "peer", jac, _backpack_sqrt_ggn),
        Method("nngeometry Jacobian", "peer", both, _nngeometry, needs="nngeometry"),
        Method("Opacus ghost clipping (norms, 1 backward)", "peer", norms, _opacus_ghost_norms, needs="opacus"),
        Method(
            "Opacus ghost clipping (norms + clipped grad, 2 backward)",
            "peer",
            norms,
            _opacus_ghost_step,
            needs="opacus",
        ),
        Method("BackPACK BatchL2Grad", "peer", norms, _backpack_batch_l2),
        Method("Opacus hooks, DPOptimizer clipping", "peer", dp, _opacus_dp_step(functorch=False), needs="opacus"),
        Method("Opacus functorch, DPOptimizer clipping", "peer", dp, _opacus_dp_step(functorch=True), needs="opacus"),
        Method("Opacus ghost clipping (2 backward)", "peer", dp, _opacus_ghost_step, needs="opacus"),
        Method("torch.func Jacobian contraction", "peer", ntk, _torch_func_ntk, reference=True),
        Method("nngeometry GramMatrix", "peer", ntk, _nngeometry_gram, needs="nngeometry", reference=True),
    ]
