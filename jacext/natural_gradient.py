"""Natural-gradient steps from per-sample Jacobians: stochastic reconfiguration (SR) and minSR.

J (M, P) is the per-sample Jacobian of the model's output, flattened over samples and
outputs (M = N C rows, P parameters); r (M,) a residual with one entry per row (for least
squares, the error f(x) - y; in variational Monte Carlo, the centred local energies). Both
steps solve the damped least-squares problem

    delta = argmin_d |J d - r|^2 + damping |d|^2 = (J^H J + damping I)^{-1} J^H r
                                                  = J^H (J J^H + damping I)^{-1} r,

the two forms being equal by the push-through identity. The first is a (P, P) solve in
parameter space (SR, for few parameters); the second an (M, M) solve in sample space
(minSR, for few samples: Chen & Heyl, Nature Physics 2024). J and r may be complex (complex
log-amplitudes with complex parameters): J^H is the conjugate transpose. For *real*
parameters with a complex J, the real step uses Re(J^H J) and Re(J^H r): pass the stacked
real matrix ``torch.cat([J.real, J.imag])`` and residual ``torch.cat([r.real, r.imag])``.

:class:`SR` is an optimizer that reads ``p.jacobian`` (``jacext.BatchJacobian``) and applies
``p -= lr * delta``.
"""

from typing import Iterable, Optional

import torch
from torch import Tensor


def minsr_step(J: Tensor, residual: Tensor, damping: float) -> Tensor:
    """``J^H (J J^H + damping I)^{-1} residual``, solved in sample space by Cholesky.

    Args:
        J: (M, P), or (N, *out, P) whose leading dimensions are flattened into M rows.
        residual: M entries, any shape (for example (N, *out)).
        damping: added to the (M, M) matrix J J^H; > 0 keeps it positive definite
            (with 0, J must have full row rank).

    Returns the step (P,), in the common dtype of J and residual.
    """
    rows, r = _rows(J, residual)
    gram = rows @ rows.mH
    gram.diagonal().add_(damping)
    return rows.mH @ _cholesky_solve(gram, r, "J J^H + damping I")


def sr_step(J: Tensor, grad: Tensor, damping: float) -> Tensor:
    """``(J^H J / N + damping I)^{-1} grad``, solved in parameter space by Cholesky.

    Args:
        J: (N, P) or (N, *out, P): N = ``J.shape[0]`` samples, the leading dimensions
            flattened into rows. ``J^H J / N`` is the (uncentred) quantum geometric tensor,
            or the Fisher/Gauss-Newton matrix averaged over samples.
        grad: (P,), the gradient to precondition (in VMC, ``J^H r / N``).
        damping: added to the diagonal of ``J^H J / N``.

    With ``grad = J^H r / N`` and ``damping = lambda / N`` this equals
    ``minsr_step(J, r, lambda)``.
    """
    rows, g = _rows(J, grad.reshape(-1), row_count=False)
    metric = rows.mH @ rows / J.shape[0]
    metric.diagonal().add_(damping)
    return _cholesky_solve(metric, g, "J^H J / N + damping I")


class SR(torch.optim.Optimizer):
    """Natural-gradient optimizer: ``p -= lr * delta`` with the damped least-squares step.

    ``delta = J^H (J J^H + damping I)^{-1} r = (J^H J + damping I)^{-1} J^H r`` where J (N C, P)
    is the concatenation of every parameter's ``p.jacobian`` (``model.parameters()`` order,
    that is the order of the parameter groups) and r the residual passed to :meth:`step`.
    ``mode="minsr"`` solves in sample space (:func:`minsr_step`), ``mode="sr"`` in parameter
    space (:func:`sr_step`); they give the same step, pick the smaller of N C and P.

    For a least-squares loss ``0.5 |f(x) - y|^2`` with residual ``f(x) - y`` this is a damped
    Gauss-Newton step. For variational Monte Carlo (the model returns log psi(s) per sample
    s) pass ``center=True`` and the local energies minus their mean: rows become
    ``O_k(s) - <O_k>`` (per output, averaged over samples), and the step is imaginary-time
    evolution ``delta = (S + damping / N)^{-1} F`` with the quantum geometric tensor
    ``S = <(O - <O>)^H (O - <O>)>`` and force ``F = <(O - <O>)^H (E_loc - <E_loc>)>``.

    Usage (``model`` extended with ``jacext.extend``)::

        opt = SR(model.parameters(), lr=0.1, damping=1e-4)
        with backpack(jacext.BatchJacobian()):
            out = model(x)
            out.backward(out - y)       # or a loss's backward: fills p.jacobian
        opt.step((out - y).detach())

    Each step consumes the Jacobians: ``p.jacobian`` is deleted, so that a step after a
    backward pass outside the ``backpack`` context raises instead of reusing stale ones.
    ``lr`` may differ between parameter groups; damping, mode and center are global, since
    the solve couples all parameters. The step is real: a complex parameter p = a + i b counts
    as its real and imaginary parts (its ``p.jacobian``, d/da + i d/db, gives the columns of
    a and b), and the output and the residual are real (a complex log psi returned as
    ``torch.view_as_real``).
    """

    def __init__(
        self, params: Iterable, lr: float = 0.1, damping: float = 1e-4, mode: str = "minsr", center: bool = False
    ):
        if mode not in ("minsr", "sr"):
            raise ValueError(f"mode must be 'minsr' or 'sr', got {mode!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        super().__init__(params, {"lr": lr})
        self.damping, self.mode, self.center = damping, mode, center

    @torch.no_grad()  # the step needs the residual, not a closure: a different signature from Optimizer.step
    def step(self, residual: Tensor, weights: Optional[Tensor] = None) -> None:  # type: ignore[override]
        """Apply ``p -= lr * delta`` for the residual (N, *out.shape[1:]) of this batch.

        ``weights`` (N,), optional: relative weights of the samples (for exactly enumerated
        configurations in VMC, |psi(s)|^2), rescaled to mean one: row n of J (after
        centring with the weighted mean) and residual n are multiplied by sqrt(w_n).
        Uniform weights give the unweighted step.
        """
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        missing = [i for i, p in enumerate(params) if not hasattr(p, "jacobian")]
        if missing:
            raise RuntimeError(
                f"parameters {missing} (optimizer order) have no p.jacobian: run the forward and "
                "backward pass inside `with backpack(jacext.BatchJacobian()):` before each step"
            )
        if residual.is_complex():
            raise ValueError(
                "the step is real (a complex parameter counts as its real and imaginary parts): return "
                "torch.view_as_real(output) from the model and pass the residual the same way"
            )
        n = residual.shape[0]
        for i, p in enumerate(params):
            if p.jacobian.shape[: residual.dim()] != residual.shape:
                raise ValueError(
                    f"parameter {i}: p.jacobian {tuple(p.jacobian.shape)} does not start with the "
                    f"residual's shape {tuple(residual.shape)}"
                )
        jac = torch.cat([_real_columns(p.jacobian.reshape(n, residual[0].numel(), -1)) for p in params], dim=2)
        r = residual.reshape(n, -1)
        w = None if weights is None else (weights / weights.mean()).to(jac.dtype)
        if self.center:
            jac = jac - (jac if w is None else w.view(-1, 1, 1) * jac).mean(0)
        if w is not None:
            jac, r = jac * w.sqrt().view(-1, 1, 1), r * w.sqrt().view(-1, 1)
        if self.mode == "minsr":
            delta = minsr_step(jac, r, self.damping)
        else:
            delta = sr_step(jac, jac.flatten(0, 1).mH @ r.reshape(-1) / n, self.damping / n)
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    size = p.numel() * (2 if p.is_complex() else 1)
                    step = delta[offset : offset + size]
                    if p.is_complex():  # (real parts, imaginary parts)
                        step = torch.complex(step[: p.numel()], step[p.numel() :])
                    p.sub_(group["lr"] * step.view_as(p))
                    offset += size
                    del p.jacobian


def _real_columns(J: Tensor) -> Tensor:
    """A parameter's Jacobian (N, C, P) as real columns: a complex parameter's J = d/da + i d/db
    (autograd's convention, p = a + i b) as the 2P real columns (d/da, d/db)."""
    return torch.cat([J.real, J.imag], dim=2) if J.is_complex() else J


def _rows(J: Tensor, vector: Tensor, row_count: bool = True):
    """J as (M, P) and ``vector`` flattened, both in their common dtype; checks the sizes."""
    rows = J.reshape(-1, J.shape[-1])
    flat = vector.reshape(-1)
    expected = rows.shape[0] if row_count else rows.shape[1]
    if flat.numel() != expected:
        what = "rows of J" if row_count else "parameters (columns of J)"
        raise ValueError(f"got {flat.numel()} entries for {expected} {what}")
    dtype = torch.promote_types(rows.dtype, flat.dtype)
    return rows.to(dtype), flat.to(dtype)


def _cholesky_solve(matrix: Tensor, rhs: Tensor, what: str) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if info.item() != 0:
        raise ValueError(f"{what} is not positive definite: increase the damping")
    return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
