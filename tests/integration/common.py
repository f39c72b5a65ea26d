"""The integration oracle: per-sample gradients by a loop of plain autograd over samples.

``per_sample_reference(forward, loss, n)`` differentiates ``loss(out)`` with only sample n's
output attached to the graph (the others detached), for every n: sample n's contribution to
the gradient of the batch loss, whatever the loss's normalisation. Nothing here uses jacext.
"""

import torch
from backpack import backpack

import jacext


def per_sample_reference(model, forward, loss, n):
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    out = forward()
    rows = []
    for i in range(n):
        keep = torch.zeros(n, dtype=torch.bool).view(-1, *[1] * (out.dim() - 1))
        keep[i] = True
        gs = torch.autograd.grad(loss(torch.where(keep, out, out.detach())), [p for _, p in params],
                                 retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, (_, p) in zip(gs, params, strict=True)])
    return {name: torch.stack([r[i] for r in rows]) for i, (name, _) in enumerate(params)}


def assert_per_sample(model, reference, field="grad_batch", rtol=1e-10):
    scale = max(r.abs().max().item() for r in reference.values())
    assert scale > 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        got = getattr(p, field)
        want = reference[name] if field == "grad_batch" else reference[name].flatten(1).square().sum(1)
        s = scale if field == "grad_batch" else scale**2
        assert got.shape == want.shape, (name, got.shape, want.shape)
        err = (got - want).abs().max().item() / s
        assert err < rtol, (name, err)


def run_extensions(model, forward_loss):
    """BatchGrad and BatchL2Grad in one backward of ``forward_loss()`` (a scalar)."""
    model.zero_grad()
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        forward_loss().backward()
