"""What a benchmarked method is, the reference (plain) pass, and jacext's methods.

A method's ``setup(case)`` returns a :class:`Prepared`: ``run()`` computes the
workload's quantity once (this is what is timed) and returns it; ``standard``
turns that return value into the common layout (a list in ``model.parameters()``
order of ``(N, *p.shape)`` gradients or ``(N, C, *p.shape)`` Jacobians, ``[norms]``,
``[kernel]``, or the clipped sums ``p.shape``: :mod:`~benchmarks.workloads`) without being timed. Methods that store
results on parameters clear them at the start of ``run`` so that, for every method,
the previous result is freed before the next.
"""

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Tuple

import torch
from backpack import backpack
from torch import Tensor, nn

import jacext
from benchmarks.workloads import QUANTITIES, Case
from jacext.dp import ClipGrad
from jacext.extensions import JacextExtension

CLIP_NORM = 1.0  # the clipping threshold of the methods that also clip (the cost does not depend on it)


class Unsupported(Exception):
    """The method cannot compute this workload; the message says why."""


@dataclass
class Prepared:
    """A method bound to one case; ``model``, where set, holds what ``run`` leaves besides its
    result (the clipping methods' ``p.grad``, read by the tests)."""

    run: Callable[[], Any]
    standard: Callable[[Any], Optional[List[Tensor]]] = list
    model: Optional[nn.Module] = None


@dataclass(frozen=True)
class Method:
    """A named way to compute per-sample gradients and/or Jacobians.

    ``family`` is ``"plain"`` (the reference pass, ratio 1), ``"peer"`` or
    ``"jacext"``; ``quantities`` lists the workload kinds it takes part in;
    ``needs`` names a module whose import failure makes it "n/a"; jacext's results
    are checked against the first ``reference`` peer that can do the workload.
    """

    name: str
    family: str
    quantities: Tuple[str, ...]
    setup: Callable[[Case], Prepared]
    needs: str = "torch"
    reference: bool = False


Params = List[Tuple[str, nn.Parameter]]


def under_autocast(method: Method, device_type: str, dtype: torch.dtype) -> Method:
    """``method`` with its runs (not its setup) under ``torch.autocast(device_type, dtype)``."""

    def setup(case: Case) -> Prepared:
        prepared = method.setup(case)

        def run() -> Any:
            with torch.autocast(device_type, dtype=dtype):
                return prepared.run()

        return replace(prepared, run=run)

    return replace(method, setup=setup)


def trainable(model: nn.Module) -> Params:
    """``(name, parameter)`` of the parameters the quantity is taken of."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def clear(params: Params, attr: str) -> None:
    for _, p in params:
        if hasattr(p, attr):
            delattr(p, attr)


def collect(params: Params, attr: str, who: str) -> List[Tensor]:
    """``p.<attr>`` of every parameter; :class:`Unsupported` naming those that got none."""
    missing = [name for name, p in params if getattr(p, attr, None) is None]
    if missing:
        raise Unsupported(f"{who} left no .{attr} on {', '.join(missing)}")
    return [getattr(p, attr) for _, p in params]


def _plain(case: Case) -> Prepared:
    model = case.model

    def run() -> None:
        model.zero_grad(set_to_none=True)
        case.loss(model(case.x), case.y).backward()

    return Prepared(run, standard=lambda _: None)


def _jacext_extension(extension: type, attr: str, reuse: bool = False) -> Callable[[Case], Prepared]:
    """jacext's ``extension`` in a ``backpack`` context around the summed loss's backward.
    ``reuse``: the previous results are not cleared first, so jacext writes into them (as in a
    training loop that does not keep them)."""

    def setup(case: Case) -> Prepared:
        model = jacext.extend(copy.deepcopy(case.model))
        params = trainable(model)

        def run() -> List[Tensor]:
            model.zero_grad(set_to_none=True)
            if not reuse:
                clear(params, attr)
            with backpack(extension()):
                case.loss(model(case.x), case.y).backward()
            return collect(params, attr, "jacext")

        return Prepared(run)

    return setup


def norms_from_squares(squares: List[Tensor]) -> Tensor:
    """``(N,)`` per-sample total norms from per-parameter squared norms ``(N,)``."""
    return torch.stack(squares).sum(0).sqrt()


def _jacext_norms(extension: Callable[[], JacextExtension], attr: str) -> Callable[[Case], Prepared]:
    """Per-sample norms from jacext's squared norms per parameter (``p.batch_l2``, ``p.per_sample_l2``)."""

    def setup(case: Case) -> Prepared:
        model = jacext.extend(copy.deepcopy(case.model))
        params = trainable(model)

        def run() -> List[Tensor]:
            model.zero_grad(set_to_none=True)
            clear(params, attr)
            with backpack(extension()):
                case.loss(model(case.x), case.y).backward()
            return [norms_from_squares(collect(params, attr, "jacext"))]

        return Prepared(run, model=model)

    return setup


def _clip_grad() -> JacextExtension:
    return ClipGrad(max_grad_norm=CLIP_NORM, loss_reduction="sum")


def _jacext_dp_step(case: Case) -> Prepared:
    """``ClipGrad`` in a ``backpack`` context around the summed loss's backward: ``p.grad`` is the clipped sum."""
    model = jacext.extend(copy.deepcopy(case.model))
    params = trainable(model)

    def run() -> List[Tensor]:
        model.zero_grad(set_to_none=True)
        clear(params, "per_sample_l2")
        with backpack(_clip_grad()):
            case.loss(model(case.x), case.y).backward()
        return collect(params, "grad", "jacext")

    return Prepared(run, model=model)


def _jacext_ntk(case: Case) -> Prepared:
    model = jacext.extend(copy.deepcopy(case.model))
    mode = case.quantity.split("-")[1]  # "ntk-full" -> "full"
    return Prepared(lambda: [jacext.ntk(model, case.x, mode=mode)])


def _jacext_jacobian(case: Case) -> Prepared:
    model = jacext.extend(copy.deepcopy(case.model))
    return Prepared(lambda: jacext.jacobian(model, case.x), standard=lambda d: list(d.values()))


def plain() -> Method:
    return Method("plain forward+backward", "plain", QUANTITIES, _plain)


def jacext_methods() -> List[Method]:
    return [
        Method("jacext BatchGrad", "jacext", ("grad",), _jacext_extension(jacext.BatchGrad, "grad_batch")),
        Method(
            "jacext BatchGrad, memory reused",
            "jacext",
            ("grad",),
            _jacext_extension(jacext.BatchGrad, "grad_batch", reuse=True),
        ),
        Method("jacext BatchJacobian", "jacext", ("jacobian",), _jacext_extension(jacext.BatchJacobian, "jacobian")),
        Method(
            "jacext BatchJacobian, memory reused",
            "jacext",
            ("jacobian",),
            _jacext_extension(jacext.BatchJacobian, "jacobian", reuse=True),
        ),
        Method("jacext.jacobian", "jacext", ("jacobian",), _jacext_jacobian),
        Method("jacext BatchL2Grad", "jacext", ("norms",), _jacext_norms(jacext.BatchL2Grad, "batch_l2")),
        Method(
            "jacext.dp.ClipGrad (norms + clipped grad)",
            "jacext",
            ("norms",),
            _jacext_norms(_clip_grad, "per_sample_l2"),
        ),
        Method("jacext.ntk", "jacext", ("ntk-full", "ntk-trace"), _jacext_ntk),
        Method("jacext.dp.ClipGrad (1 backward)", "jacext", ("dp-step",), _jacext_dp_step),
    ]
