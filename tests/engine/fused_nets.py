"""Models, data and comparisons shared by the tests of fused calls (jacext.engine.fused).

* ``Tiny``: Embedding -> LayerNorm -> Linear -> GELU -> Linear -> pooling -> head, the
  transformer-like model whose Linears run at >= 16 positions per sample (fused under BatchGrad).
* ``twins``/``expected``/``assert_matches``: a model, an identical copy jacext never extends, the
  loop's per-sample gradients (``loop_grad_batch``) and the plain p.grad, and the comparison.
* ``watch``: the grad_fn class of a submodule's output per call (``FUSED`` where it hangs from a
  FusedGrads node).
* ``CONVS``/``ConvNet``: convolutions with more or fewer than 16 output positions per sample.
* ``clipped_reference``/``assert_clipped``: the loop's clipped sums for ClipGrad, and the comparison.
"""

import copy
from functools import partial

import torch
import torch.nn.functional as F
from reference import assert_close, loop_grad_batch, overall_scale
from torch import nn

import jacext

FUSED = "FusedGradsBackward"


class Tiny(nn.Module):
    """Embedding -> LayerNorm -> Linear -> GELU -> Linear -> pooling over the sequence -> head.
    ``pool="none"``: the head runs at every position, output (N, T, 3). ``side``: a Linear whose
    output does not reach the model's output."""

    def __init__(self, pool="mean", up_bias=True, side=False):
        super().__init__()
        self.pool = pool
        self.emb, self.norm = nn.Embedding(50, 8), nn.LayerNorm(8)
        self.up, self.down, self.head = nn.Linear(8, 16, bias=up_bias), nn.Linear(16, 8), nn.Linear(8, 3)
        self.side = nn.Linear(8, 8) if side else None

    def forward(self, x):
        h = self.norm(self.emb(x))
        if self.side is not None:
            self.side(h)
        h = self.down(F.gelu(self.up(h)))
        if self.pool == "mean":
            h = h.mean(1)
        elif self.pool == "sum":
            h = h.sum(1)
        elif self.pool == "max":
            h = h.amax(1)
        return self.head(h)


def ce_loss(out, y):
    """Cross-entropy summed over samples (and positions, for an output (N, T, C))."""
    return F.cross_entropy(out.transpose(1, 2) if out.dim() == 3 else out, y, reduction="sum")


def sq_loss(out, y):
    return (out - y).square().sum()


def data(n, t=20, pool="mean", loss="ce", dtype=torch.float64, classes=3):
    x = torch.randint(0, 50, (n, t))
    shape = (n, t) if pool == "none" else (n,)
    y = torch.randint(0, classes, shape) if loss == "ce" else torch.randn(*shape, classes, dtype=dtype)
    return x, y


def twins(model, dtype):
    """``model`` in ``dtype``, extended, and an identical copy jacext never sees."""
    model = model.to(dtype)
    plain = copy.deepcopy(model)
    return jacext.extend(model), plain


def expected(plain, lossfunc, y, *args):
    """The loop's per-sample gradients and the plain model's p.grad."""
    per_sample = loop_grad_batch(plain, lossfunc, y, *args)
    plain.zero_grad()
    lossfunc(plain(*args), y).backward()
    grads = {name: p.grad.clone() for name, p in plain.named_parameters() if p.grad is not None}
    plain.zero_grad()
    return per_sample, grads


def assert_matches(model, per_sample, grads, dtype, l2=False, grad_factor=1.0, grad=True):
    """Every trainable parameter's grad_batch (and batch_l2) against the loop, p.grad against the
    plain model; a frozen parameter gets neither. Keeps no reference to the results."""
    scale, scale_grad = overall_scale(per_sample), overall_scale(grads)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and not hasattr(p, "grad_batch"), name
            continue
        assert_close(p.grad_batch, per_sample[name], dtype, f"grad_batch of {name}", scale)
        if l2:
            sq = per_sample[name].flatten(1).square().sum(1)
            assert_close(p.batch_l2, sq, dtype, f"batch_l2 of {name}", scale**2)
        if grad and name not in grads:  # its output does not reach the loss
            assert p.grad is None, name
        elif grad:
            assert_close(p.grad, grad_factor * grads[name], dtype, f"grad of {name}", grad_factor * scale_grad)


def watch(model, *names):
    """grad_fn class names of the named submodules' outputs, per call (hooks after extend)."""
    seen: dict[str, list[str]] = {name: [] for name in names}

    def note(name, module, args, out):
        seen[name].append(type(out.grad_fn).__name__)

    for name in names:
        model.get_submodule(name).register_forward_hook(partial(note, name))
    return seen


EXTS = {"BatchGrad": lambda: [jacext.BatchGrad()], "BatchGrad+L2": lambda: [jacext.BatchGrad(), jacext.BatchL2Grad()]}


# the first conv of ConvNet and the input's shape per sample; its output's positions decide fusing
CONVS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6)),  # 36 positions
    "stride_dilation": (lambda: nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2), (3, 8, 8)),  # 16
    "groups_no_bias": (lambda: nn.Conv2d(4, 6, (3, 2), groups=2, bias=False, padding=1), (4, 5, 5)),  # 30
    "same": (lambda: nn.Conv2d(3, 4, (4, 3), padding="same", dilation=(1, 2)), (3, 5, 6)),  # 30
    "reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 5, 5)),  # 25
    "circular": (lambda: nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode="circular"), (3, 4, 5)),  # 28
    "conv1d_replicate": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, padding_mode="replicate"), (3, 30)),  # 16
    "conv1d_15": (lambda: nn.Conv1d(3, 4, 2), (3, 16)),  # 15: not fused
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), (2, 3, 3, 3)),  # 64
}


class ConvNet(nn.Module):
    """conv -> ReLU(inplace=True) -> tail (a conv of the same dimension with 3 or 2 output positions
    per dimension: fewer than 16) -> Flatten -> head (a Linear)."""

    def __init__(self, conv: nn.Module, shape):
        super().__init__()
        self.conv, self.relu = conv, nn.ReLU(inplace=True)
        with torch.no_grad():
            out = conv(torch.zeros(1, *shape)).shape[2:]
        self.positions = out.numel()
        left = 3 if len(out) < 3 else 2
        self.tail = type(conv)(conv.out_channels, 2, [s - left + 1 for s in out])
        self.head = nn.Linear(2 * left ** len(out), 3)

    def forward(self, x):
        return self.head(self.tail(self.relu(self.conv(x))).flatten(1))


def clipped_reference(per_sample, reduction):
    """From the loop's contributions, with g_n sample n's own gradient (N times its contribution for
    "mean"): a bound C (the median norm) that clips some samples and not others, the clipped sums
    sum_n w_n g_n with w_n = min(1, C / (||g_n|| + 1e-6)), and the squared norms ||g_n[p]||^2."""
    n = next(iter(per_sample.values())).shape[0]
    grads = {name: g * (n if reduction == "mean" else 1) for name, g in per_sample.items()}
    l2 = {name: g.flatten(1).square().sum(1) for name, g in grads.items()}
    norms = sum(l2.values()).sqrt()
    bound = norms.median().item()
    w = (bound / (norms + 1e-6)).clamp(max=1.0)
    assert (w < 1).any() and (w == 1).any()
    clipped = {name: (w.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) for name, g in grads.items()}
    return bound, clipped, l2


def assert_clipped(model, clipped, l2, dtype, grad_factor=1.0, layouts=None):
    """p.grad against the clipped sums (in the layout of ``layouts``, the plain model's p.grad, where
    given: sparse for a sparse Embedding's weight), p.per_sample_l2 against the squared norms."""
    scale, scale_l2 = overall_scale(clipped), overall_scale(l2)
    for name, p in model.named_parameters():
        if layouts is not None:
            assert p.grad.layout == layouts[name].layout, name
        got = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert_close(got, grad_factor * clipped[name], dtype, f"clipped grad of {name}", grad_factor * scale)
        assert_close(p.per_sample_l2, l2[name], dtype, f"per_sample_l2 of {name}", scale_l2)
