"""The independent oracle: autograd loops over samples and output coordinates.

Nothing here uses jacext. ``loop_jacobian`` differentiates every scalar
``out[n, c]`` separately; ``loop_grad_batch`` differentiates the loss with only
sample n's output left attached to the graph, which is sample n's contribution
to the loss (with whatever normalisation the loss applies).
"""

import torch
from backpack import backpack

import jacext


def trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _grads(scalar, params):
    gs = torch.autograd.grad(scalar, [p for _, p in params], retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.to_dense() for g, (_, p) in zip(gs, params, strict=True)]


def loop_jacobian(model, *args):
    """{name: (N, *out.shape[1:], *p.shape)} by N * C backward passes."""
    params = trainable(model)
    out = model(*args)
    flat = out.reshape(out.shape[0], -1)
    rows = [[_grads(flat[n, c], params) for c in range(flat.shape[1])] for n in range(flat.shape[0])]
    return {
        name: torch.stack([torch.stack([row[c][i] for c in range(len(row))]) for row in rows]).reshape(
            *out.shape, *p.shape
        )
        for i, (name, p) in enumerate(params)
    }


def loop_grad_batch(model, lossfunc, y, *args):
    """{name: (N, *p.shape)}: per-sample contributions to the gradient of the batch loss."""
    params = trainable(model)
    out = model(*args)
    per_sample = []
    for n in range(out.shape[0]):
        keep = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        keep[n] = True
        keep = keep.view(-1, *([1] * (out.dim() - 1)))
        per_sample.append(_grads(lossfunc(torch.where(keep, out, out.detach()), y), params))
    return {name: torch.stack([g[i] for g in per_sample]) for i, (name, _) in enumerate(params)}


def squared_norms(g):
    """(N, *shape) -> (N,): the squared norm of every sample's entry (of a complex one, the sum
    of the squares of its real and imaginary parts)."""
    r = torch.view_as_real(g) if g.is_complex() else g
    return r.square().flatten(1).sum(1) if r.dim() > 1 else r.square()


def tolerances(dtype):
    return (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)


def assert_close(actual, expected, dtype, what="", scale=None):
    """Relative agreement, with the absolute floor scaled to the size of the expected values.

    ``scale`` (default: the largest expected entry) sets that floor; the checks below pass the
    largest entry over all parameters, so that a parameter whose exact derivative is zero
    (a bias before a normalisation) is compared at the precision of the whole Jacobian.
    """
    rtol, atol = tolerances(dtype)
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 1.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def overall_scale(tensors):
    return max((t.abs().max().item() for t in tensors.values() if t.numel()), default=1.0)


def check_jacobian(model, *args):
    """jacext.BatchJacobian (through out.backward) and jacext.jacobian against the loop."""
    dtype = args[0].dtype if args[0].is_floating_point() else next(model.parameters()).dtype
    expected = loop_jacobian(model, *args)
    jacext.extend(model)
    with backpack(jacext.BatchJacobian()):
        out = model(*args)
        out.backward(torch.randn_like(out))
    scale = overall_scale(expected)
    for name, p in trainable(model):
        assert_close(p.jacobian, expected[name], dtype, f"p.jacobian of {name}", scale)
    got = jacext.jacobian(model, args if len(args) > 1 else args[0])
    for name, value in got.items():
        assert_close(value, expected[name], dtype, f"jacext.jacobian of {name}", scale)
    return expected


def check_grad_batch(model, lossfunc, y, *args):
    """jacext.BatchGrad + BatchJacobian in one backward against the loops; p.grad unchanged."""
    dtype = next(model.parameters()).dtype
    expected = loop_grad_batch(model, lossfunc, y, *args)
    expected_jac = loop_jacobian(model, *args)
    plain = _grads(lossfunc(model(*args), y), trainable(model))
    jacext.extend(model)
    model.zero_grad()
    with backpack(jacext.BatchGrad(), jacext.BatchJacobian()):
        lossfunc(model(*args), y).backward()
    scale, scale_jac = overall_scale(expected), overall_scale(expected_jac)
    for (name, p), g in zip(trainable(model), plain, strict=True):
        assert_close(p.grad_batch, expected[name], dtype, f"p.grad_batch of {name}", scale)
        assert_close(p.jacobian, expected_jac[name], dtype, f"p.jacobian of {name}", scale_jac)
        assert_close(p.grad, g, dtype, f"p.grad of {name}", scale)
