"""Mixed precision: every jacext extension under ``torch.autocast`` (bfloat16 and float16).

The reference is the autograd loop of ``tests/reference.py`` run inside the same autocast context
(per sample, the layers compute in the dtypes autocast gives them), compared with a tolerance of
the dtype's precision (``TOL``: relative to the largest expected entry); and the float32 loop,
with a looser bound (``TOL_F32``). Results have the parameter's dtype (float32), p.grad matches
an identical model that jacext never extended (under the same autocast), and a refused backward
leaves no result of an earlier batch and p.grad as it was. The fused paths (BatchGrad on Linear
with 16 positions and on Conv, ClipGrad's clipped sums in one backward) run where they apply.
CUDA cases skip without a CUDA device.
"""

import copy

import pytest
import torch
from backpack import backpack
from reference import loop_grad_batch, loop_jacobian, trainable
from torch import nn

import jacext
import jacext.rules.linear as linear_rules
from jacext.dp import ClipGrad, PrivacyEngine
from jacext.dp.clip import EPS

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
LOW = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}  # against the loop under the same autocast
TOL_F32 = {torch.bfloat16: 1e-1, torch.float16: 2e-2}  # against the float32 loop
N = 3


class Seq(nn.Module):
    """A recurrent layer's output sequence into a Linear."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.fc = rnn, nn.Linear(rnn.hidden_size, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


class SelfAttention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(d, 2, batch_first=True), nn.Linear(d, 2)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


class Block(nn.Module):
    """A small transformer block: embedding, pre-norm attention and MLP with residuals, mean, head."""

    def __init__(self, vocab=12, d=8):
        super().__init__()
        self.emb, self.ln1, self.ln2 = nn.Embedding(vocab, d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


class Upcast(nn.Module):
    """A model that returns float32 under autocast: the root's cotangent is wider than its layers'."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x).float()


def floats(*shape):
    return lambda n: torch.randn(n, *shape)


def tokens(vocab, t):
    return lambda n: torch.randint(0, vocab, (n, t))


MODELS = {
    "linear": (lambda: nn.Linear(6, 3), floats(6)),
    # 16 positions per sample: BatchGrad's fused Linear
    "linear-3d": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), floats(16, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2)), floats(2, 18)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(75, 2)), floats(2, 5, 5)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 2)), tokens(10, 4)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)), floats(6)),
    "groupnorm": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(36, 2)),
        floats(2, 5, 5),
    ),
    "lstm": (lambda: Seq(nn.LSTM(4, 5, batch_first=True)), floats(N, 4)),  # T = N
    "gru": (lambda: Seq(nn.GRU(4, 5, batch_first=True)), floats(4, 4)),
    "mha": (SelfAttention, floats(N, 8)),  # T = N
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16, 3),
        ),
        floats(1, 8, 8),
    ),
    "transformer": (Block, tokens(12, 5)),
    "upcast": (Upcast, floats(6)),
}
FUSED = {"linear-3d", "conv1d", "conv2d", "cnn"}  # BatchGrad's plan fuses a layer with 16+ positions


def unsupported(name, dtype, device):
    """What torch itself cannot run: oneDNN's LSTM has no float16 training kernel on the CPU
    (an inference one on some), nor a bfloat16 one on CPUs without bfloat16 instructions
    (AVX-512 BF16, AMX); tried with gradients, as the tests run it, not guessed."""
    if name != "lstm" or device != "cpu":
        return
    model, x, _ = case(name, device)
    try:
        with autocast(device, dtype):
            model(x)
    except RuntimeError as error:
        pytest.skip(f"torch's CPU LSTM does not run under {dtype} autocast here (oneDNN): {error}")


def case(name, device, n=N):
    """A model of ``MODELS`` in float32 on ``device``, inputs, targets and the sum-of-squares loss."""
    make, inputs = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device)
    x = inputs(n).to(device)
    with torch.no_grad():
        y = torch.randn_like(model(x).float())
    return model, x, y


def sq_loss(out, y):
    return ((out.float() - y) ** 2).sum()


def autocast(device, dtype):
    return torch.autocast(device, dtype=dtype)


def reference(model, x, y, device, dtype):
    """Per-sample gradients and Jacobians by the loops under autocast ``dtype`` (None: float32)."""
    model = copy.deepcopy(model)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        return loop_grad_batch(model, sq_loss, y, x), loop_jacobian(model, x)


def plain_grads(model, x, y, device, dtype):
    model = copy.deepcopy(model)
    with autocast(device, dtype):
        loss = sq_loss(model(x), y)
    loss.backward()
    return {k: p.grad for k, p in trainable(model)}


def close(actual, expected, tol, what, scale=None):
    scale = expected.abs().max().item() if scale is None else scale
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def largest(values):
    return max(v.abs().max().item() for v in values.values())


def check(model, field, expected, tol, what):
    scale = largest(expected)
    for k, p in trainable(model):
        assert getattr(p, field).dtype == p.dtype, f"{what} {k}: {getattr(p, field).dtype}"
        close(getattr(p, field), expected[k], tol, f"{what} {field} of {k}", scale)


def sq_norms(per_sample):
    return {k: g.flatten(1).square().sum(1) for k, g in per_sample.items()}


def run(model, x, y, device, dtype, *extensions):
    jacext.extend(model)
    with backpack(*extensions):
        with autocast(device, dtype):
            loss = sq_loss(model(x), y)
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_batch_grad_and_l2_match_the_loops(name, dtype, device):
    unsupported(name, dtype, device)
    model, x, y = case(name, device)
    (grads, _), (grads32, _) = reference(model, x, y, device, dtype), reference(model, x, y, device, None)
    plain = plain_grads(model, x, y, device, dtype)
    run(model, x, y, device, dtype, jacext.BatchGrad(), jacext.BatchL2Grad())
    if name in FUSED:
        assert jacext.backward_plan(model) == "inline, fused"
    check(model, "grad_batch", grads, TOL[dtype], "autocast")
    check(model, "grad_batch", grads32, TOL_F32[dtype], "float32")
    check(model, "batch_l2", sq_norms(grads), 2 * TOL[dtype], "autocast")
    check(model, "grad", plain, TOL[dtype], "plain autograd")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_batch_l2_alone_uses_the_norm_rules(name, dtype, device):
    unsupported(name, dtype, device)
    model, x, y = case(name, device)
    grads, _ = reference(model, x, y, device, dtype)
    run(model, x, y, device, dtype, jacext.BatchL2Grad())
    check(model, "batch_l2", sq_norms(grads), 2 * TOL[dtype], "autocast")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_batch_jacobian_matches_the_loop(name, dtype, device):
    unsupported(name, dtype, device)
    model, x, y = case(name, device)
    (_, jac), (_, jac32) = reference(model, x, y, device, dtype), reference(model, x, y, device, None)
    jacext.extend(model)
    with backpack(jacext.BatchJacobian()):
        with autocast(device, dtype):
            out = model(x)
        out.backward(torch.randn_like(out))
    check(model, "jacobian", jac, TOL[dtype], "autocast")
    check(model, "jacobian", jac32, TOL_F32[dtype], "float32")


def clipped_sums(per_sample, bound):
    """sum_n w_n g_n, w_n = min(1, C / (||g_n|| + 1e-6)), and the squared norms per parameter."""
    l2 = sq_norms(per_sample)
    w = (bound / (torch.stack(list(l2.values())).sum(0).sqrt() + EPS)).clamp(max=1.0)
    return {k: torch.einsum("n,n...->...", w, g) for k, g in per_sample.items()}, l2


def median_bound(per_sample):
    norms = torch.stack(list(sq_norms(per_sample).values())).sum(0).sqrt()
    return norms.median().item()  # some samples clipped, some not


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_clip_grad_sums_match_the_loop(name, dtype, device):
    unsupported(name, dtype, device)
    model, x, y = case(name, device)
    grads, _ = reference(model, x, y, device, dtype)
    bound = median_bound(grads)
    sums, l2 = clipped_sums(grads, bound)
    run(model, x, y, device, dtype, ClipGrad(bound, loss_reduction="sum"))
    if name in ("linear", "cnn", "upcast"):
        assert jacext.backward_plan(model) == "inline, clipping"
    check(model, "per_sample_l2", l2, 2 * TOL[dtype], "autocast")
    check(model, "grad", sums, 2 * TOL[dtype], "clipped sum")


@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.filterwarnings("ignore:poisson_sampling=False with a data loader:UserWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["cnn", "transformer", "lstm"])
def test_dp_engine_with_a_grad_scaler(name, dtype, device):
    """PrivacyEngine with ``grad_scaler=``: the bound applies to the unscaled per-sample gradients,
    p.grad is S times the clipped sum, and ``scaler.step`` takes the step of the unscaled sum
    (no noise, a "sum" loss: the step is the clipped sum)."""
    unsupported(name, dtype, device)
    model, x, y = case(name, device, n=4)
    grads, _ = reference(model, x, y, device, dtype)
    bound = median_bound(grads)
    sums, _ = clipped_sums(grads, bound)
    scale, lr = 2.0**10, 0.1
    scaler = torch.amp.GradScaler(device, init_scale=scale)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=bound, poisson_sampling=False, loss_reduction="sum",
        grad_scaler=scaler,
    )
    before = {k: p.detach().clone() for k, p in trainable(model)}
    (xb, yb), = loader
    optimizer.zero_grad()
    with autocast(device, dtype):
        loss = sq_loss(private(xb), yb)
    scaler.scale(loss).backward()
    scaled = {k: p.grad / scale for k, p in trainable(model)}
    scaler.step(optimizer)
    scaler.update()
    top = largest(sums)
    for k, p in trainable(model):
        close(scaled[k], sums[k], 2 * TOL[dtype], f"p.grad / S of {k}", top)
        close(p.detach(), before[k] - lr * sums[k], 2 * TOL[dtype], f"step of {k}", lr * top)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["linear", "linear-3d", "conv2d", "embedding"])
def test_squared_norms_of_scaled_gradients_do_not_overflow(name, dtype, device):
    """At a loss scale whose gradients float16 holds, the squared norms of the scaled per-sample
    gradients exceed its range: computed in float16 they would be infinite and clip every sample
    to zero, with no non-finite gradient for the scaler to see."""
    model, x, y = case(name, device)
    grads, _ = reference(model, x, y, device, dtype)
    bound = median_bound(grads)
    sums, l2 = clipped_sums(grads, bound)
    scale = 2.0**10
    assert max(v.max().item() for v in l2.values()) * scale**2 > torch.finfo(torch.float16).max
    plain = copy.deepcopy(model)
    with autocast(device, dtype):
        scaled_loss = sq_loss(plain(x), y) * scale
    scaled_loss.backward()
    assert all(p.grad.isfinite().all() for p in plain.parameters())  # a step the scaler takes
    scaler = torch.amp.GradScaler(device, init_scale=scale)
    jacext.extend(model)
    with backpack(ClipGrad(bound, loss_reduction="sum", grad_scaler=scaler)):
        with autocast(device, dtype):
            loss = sq_loss(model(x), y)
        scaler.scale(loss).backward()
    check(model, "per_sample_l2", l2, 2 * TOL[dtype], "unscaled")
    top = largest(sums)
    for k, p in trainable(model):
        close(p.grad / scale, sums[k], 2 * TOL[dtype], f"p.grad / S of {k}", top)


FIELDS = {
    "BatchGrad": "grad_batch", "BatchL2Grad": "batch_l2", "BatchJacobian": "jacobian", "ClipGrad": "per_sample_l2",
}
EXTENSIONS = [jacext.BatchGrad, jacext.BatchL2Grad, jacext.BatchJacobian, lambda: ClipGrad(1.0)]


class Inner(nn.Module):
    """Keeps a hidden tensor: a loss computed from it bypasses the model's output (refused)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        self.hidden = self.fc1(x)
        return self.fc2(torch.tanh(self.hidden))


def first_batch(model, x, make, device, dtype):
    with autocast(device, dtype):
        out = model(x)
    out.float().square().sum().backward()
    field = FIELDS[type(make()).__name__]
    assert all(getattr(p, field).dtype == p.dtype for p in model.parameters())
    model.zero_grad()
    return field


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("make", EXTENSIONS, ids=list(FIELDS))
def test_nothing_stale_after_a_refused_call(make, dtype, device):
    model = jacext.extend(Inner().to(device))
    x = torch.randn(N, 6, device=device)
    with backpack(make()):
        field = first_batch(model, x, make, device, dtype)
        with autocast(device, dtype):
            model(x)
        with pytest.raises(jacext.JacextError, match="without passing through (an|the) output"):
            model.hidden.float().sum().backward()
    assert not any(hasattr(p, field) for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("make", [jacext.BatchGrad, lambda: ClipGrad(1.0)], ids=["BatchGrad", "ClipGrad"])
def test_nothing_stale_after_a_failure_inside_a_fused_backward(make, dtype, monkeypatch):
    """A layer's own backward that fails inside a fused node (ClipGrad's input gradient; the
    contraction of BatchGrad's fused Linear) stops the backward there: no parameter keeps a
    result of the previous batch (the callback that would assign the new ones never runs)."""
    model = jacext.extend(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    x = torch.randn(N, 16, 6)
    with backpack(make()):
        field = first_batch(model, x, make, "cpu", dtype)

        def fails(t, g):
            raise RuntimeError("a dtype this layer cannot contract")

        monkeypatch.setattr(linear_rules, "as_run", fails)
        with autocast("cpu", dtype):
            out = model(x)
        with pytest.raises(RuntimeError, match="cannot contract"):
            out.float().square().sum().backward()
    assert jacext.backward_plan(model) in ("inline, fused", "inline, clipping")
    assert not any(hasattr(p, field) for p in model.parameters())
