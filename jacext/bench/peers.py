"""The peers: other ways to get the same per-sample gradients or Jacobians.

Each setup imports its library itself, so a missing optional peer (Opacus,
nngeometry) only makes its own rows "n/a". Gradient-only peers (ExpandedWeights,
Opacus) compute a Jacobian the way a user of theirs would: one forward and
backward pass per output, taking the per-sample gradients of ``out[:, c].sum()``.
"""

import copy
import math
from functools import partial
from typing import Callable, List, Sequence

import torch
from torch import Tensor, nn

from jacext.bench.methods import Method, Prepared, clear, collect, trainable
from jacext.bench.workloads import Case

OPTIONAL_PEERS = ["opacus", "nngeometry"]  # imported only by their methods; may be missing
Objective = Callable[[Tensor], Tensor]  # model output -> scalar to differentiate


def _stack_rows(rows: Sequence[Sequence[Tensor]], dim: int = 0) -> List[Tensor]:
    """Rows of per-parameter tensors -> one stacked tensor per parameter."""
    return [torch.stack(per_param, dim) for per_param in zip(*rows)]


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

    return Prepared(grads if case.quantity == "grad" else jacobians)


def _func_params(model: nn.Module):
    return {name: p.detach() for name, p in trainable(model)}


def _vmap_grad(case: Case) -> Prepared:
    from torch.func import functional_call, grad, vmap

    def loss_one(params, x, y):
        return case.loss(functional_call(case.model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    params = _func_params(case.model)
    return Prepared(lambda: per_sample(params, case.x, case.y), standard=lambda d: list(d.values()))


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


def _opacus(case: Case) -> Prepared:
    from opacus import GradSampleModule

    module = GradSampleModule(copy.deepcopy(case.model), loss_reduction="sum")
    params = trainable(module)

    def grads(objective: Objective) -> List[Tensor]:
        module.zero_grad(set_to_none=True)  # clears grad_sample too
        objective(module(case.x)).backward()
        return collect(params, "grad_sample", "Opacus")

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
    """nngeometry's Jacobian (V, N, P), one backward per output: of the per-sample loss (V=1) or of the model."""
    from nngeometry import Jacobian
    from torch.utils.data import DataLoader, TensorDataset

    model = case.model
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


def peers() -> List[Method]:
    grad, jac, both = ("grad",), ("jacobian",), ("grad", "jacobian")
    return [
        Method("naive per-sample loop", "peer", both, _naive),
        Method("torch.func vmap(grad)", "peer", grad, _vmap_grad),
        Method("torch.func vmap(jacrev)", "peer", jac, _vmap_jacrev),
        Method("torch ExpandedWeights", "peer", grad, _expanded_weights),
        Method("torch ExpandedWeights (C passes)", "peer", jac, _expanded_weights),
        Method("Opacus GradSampleModule", "peer", grad, _opacus, needs="opacus"),
        Method("Opacus GradSampleModule (C passes)", "peer", jac, _opacus, needs="opacus"),
        Method("BackPACK BatchGrad", "peer", grad, _backpack_batch_grad),
        Method("BackPACK SqrtGGNExact (MSE trick)", "peer", jac, _backpack_sqrt_ggn),
        Method("nngeometry Jacobian", "peer", both, _nngeometry, needs="nngeometry"),
    ]
