"""The integration oracle: per-sample gradients by a loop of plain autograd over samples.

``per_sample_reference(forward, loss, n)`` differentiates ``loss(out)`` with only sample n's
output attached to the graph (the others detached), for every n: sample n's contribution to
the gradient of the batch loss, whatever the loss's normalisation. ``jacobian_reference``
differentiates every output entry. Random draws (dropout and drop-path masks in train mode) are
fixed by seeding every forward pass the same (:func:`seeded`): the loop's one forward and each
of jacext's draw the same masks. Nothing here uses jacext but :func:`check_extensions`.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from backpack import backpack
from torch import nn

import jacext
from jacext.dp import ClipGrad

SEED = 1234


def seeded(forward):
    """``forward`` drawing the same random numbers at every call."""

    def call():
        torch.manual_seed(SEED)
        return forward()

    return call


def _params(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _grads(scalar, params):
    gs = torch.autograd.grad(scalar, [p for _, p in params], retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(gs, params, strict=True)]


def _only(i, out):
    """A mask of out's shape (broadcast) that is true on sample i."""
    keep = torch.zeros(out.shape[0], dtype=torch.bool)
    keep[i] = True
    return keep.view(-1, *[1] * (out.dim() - 1))


def per_sample_reference(model, forward, loss, n):
    params = _params(model)
    out = forward()
    rows = [_grads(loss(torch.where(_only(i, out), out, out.detach())), params) for i in range(n)]
    return {name: torch.stack([r[i] for r in rows]) for i, (name, _) in enumerate(params)}


def jacobian_reference(model, forward):
    """{name: (N, *out.shape[1:], *p.shape)}, one backward pass per output entry."""
    params = _params(model)
    out = forward()
    rows = [_grads(o, params) for o in out.flatten()]
    return {name: torch.stack([r[i] for r in rows]).view(*out.shape, *p.shape) for i, (name, p) in enumerate(params)}


def assert_per_sample(model, reference, field="grad_batch", rtol=1e-10):
    scale = max(r.abs().max().item() for r in reference.values())
    assert scale > 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        got = getattr(p, field)
        want = reference[name] if field != "batch_l2" else reference[name].flatten(1).square().sum(1)
        s = scale if field != "batch_l2" else scale**2
        assert got.shape == want.shape, (name, got.shape, want.shape)
        err = (got - want).abs().max().item() / s
        assert err < rtol, (name, err)


def run_extensions(model, forward_loss):
    """BatchGrad and BatchL2Grad in one backward of ``forward_loss()`` (a scalar)."""
    model.zero_grad()
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        forward_loss().backward()


def clipped_reference(model, forward, loss, reference, n):
    """For a loss that is a mean over the batch: a bound C (the median of the samples' gradient
    norms ||g_n||, g_n = N times sample n's contribution, so that some are clipped and some not),
    the squared norms ||g_n[p]||^2, and sum_n w_n g_n with w_n = min(1, C / (||g_n|| + 1e-6)) twice,
    as each ClipGrad plan scales: ``"inline"``, at the layers (sum_n w_n g_n of the loop's g_n);
    ``"pull-back"``, at the output (the output's cotangent scaled per sample, then autograd). HF's
    RMSNorm and loss run in float32, whose rounding differs by 1e-8 where the scaling comes before
    or after them."""
    l2 = {name: (n * g).flatten(1).square().sum(1) for name, g in reference.items()}
    norms = sum(l2.values()).sqrt()
    bound = norms.median().item()
    w = (bound / (norms + 1e-6)).clamp(max=1.0)
    assert (w < 1).any() and (w == 1).any()
    params, out = _params(model), forward()
    (g,) = torch.autograd.grad(loss(out), [out], retain_graph=True)
    scaled = g * (n * w).view(-1, *[1] * (out.dim() - 1))
    at_output = dict(zip([name for name, _ in params], _grads((out * scaled).sum(), params), strict=True))
    at_layers = {name: torch.einsum("n,n...->...", n * w, g) for name, g in reference.items()}
    return bound, {"inline": at_layers, "pull-back": at_output}, l2


@contextmanager
def running_statistics(model, on):
    """Where ``on``, BatchNorm layers in eval mode (what ``batchnorm="eval"`` makes of them while
    jacext records), the rest of the model as it is."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] if on else []
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def check_extensions(model, forward, loss, n, *, user_loss=None, jacobian=False, rtol=1e-10, **options):
    """BatchGrad, BatchL2Grad, ClipGrad (and BatchJacobian of ``forward()`` where ``jacobian``)
    against the loops. ``forward() -> (N, ...)`` and ``loss(out)``, a mean over the batch, for
    the loop; ``user_loss()`` (default ``loss(forward())``) is what the user backpropagates with
    the extensions on; ``options`` go to ``jacext.extend``. Forward passes are :func:`seeded`."""
    forward = seeded(forward)
    user_loss = seeded(user_loss) if user_loss else (lambda: loss(forward()))
    with running_statistics(model, options.get("batchnorm") == "eval"):
        ref = per_sample_reference(model, forward, loss, n)
        bound, clipped, l2 = clipped_reference(model, forward, loss, ref, n)
        jac = jacobian_reference(model, forward) if jacobian else None
    jacext.extend(model, **options)
    run_extensions(model, user_loss)
    assert_per_sample(model, ref, rtol=rtol)
    assert_per_sample(model, ref, "batch_l2", rtol=rtol)
    model.zero_grad()
    with backpack(ClipGrad(bound, loss_reduction="mean")):
        user_loss().backward()
    clipped = clipped["inline" if jacext.backward_plan(model) == "inline, clipping" else "pull-back"]
    scale, scale_l2 = (max(t.abs().max().item() for t in d.values()) for d in (clipped, l2))
    for name, p in _params(model):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        err = (got - clipped[name]).abs().max().item() / scale
        err_l2 = (p.per_sample_l2 - l2[name]).abs().max().item() / scale_l2
        assert err < rtol and err_l2 < rtol, ("ClipGrad", name, err, err_l2)
    if jacobian:
        with backpack(jacext.BatchJacobian()):
            out = forward()
            out.backward(torch.ones_like(out))
        assert_per_sample(model, jac, "jacobian", rtol=rtol)


def check_causal_lm(model, ids, loss):
    """A HuggingFace causal LM, next-token loss computed inside the forward (``loss="labels"``: HF's
    loss, upcast to float32, which the loop then takes from the logits too) or outside."""
    vocab = model.config.vocab_size

    def forward():
        return model(input_ids=ids, use_cache=False).logits

    if loss == "labels":
        check_extensions(model, forward, lambda out: model.loss_function(out, ids, vocab_size=vocab), ids.shape[0],
                         user_loss=lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)
    else:
        shifted = ids[:, 1:].reshape(-1)
        check_extensions(model, forward, lambda out: F.cross_entropy(out[:, :-1].reshape(-1, vocab), shifted),
                         ids.shape[0])
