"""Bad input (issue #6): a clear error that says what to do, and nothing left half-done.

Adds to tests/test_api.py (which has: a never-extended model with BatchGrad, a tuple output,
an exception in the root's forward, zeros for a parameter unused in one pass, the empty batch
of an MLP, shapes replaced by the next backward). Most cases run every extension: BatchGrad,
BatchJacobian, BatchL2Grad and dp.ClipGrad. Cases marked ``xfail(strict=True)`` are what jacext
still gets wrong; their reason says what happens instead.
"""

import gc

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian
from torch import nn

import jacext
from jacext.dp import ClipGrad
from jacext.engine.hooks import recording
from jacext.engine.record import Tape

EXTENSIONS = {
    "BatchGrad": jacext.BatchGrad,
    "BatchJacobian": jacext.BatchJacobian,
    "BatchL2Grad": jacext.BatchL2Grad,
    "ClipGrad": lambda: ClipGrad(0.1, loss_reduction="sum"),
}


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def nothing_left_behind():
    """No tape open and no torch-function mode of jacext's left on the stack."""
    return recording() is None and not torch.overrides._get_current_function_mode_stack()


def untouched(model, ext):
    """Neither p.grad nor the extension's attribute was written."""
    return all(p.grad is None and not hasattr(p, ext.savefield) for p in model.parameters())


def snapshot(model, field):
    return [(getattr(p, field).clone(), p.grad.clone()) for p in model.parameters()]




def xfail(reason):
    return pytest.mark.xfail(strict=True, reason=reason)


def cases(marked=None, **params):
    """pytest.param per id; ``marked``: {id: xfail reason}."""
    marked = marked or {}
    return [pytest.param(v, id=k, marks=[xfail(marked[k])] if k in marked else []) for k, v in params.items()]


# --- a model that was never extended ---------------------------------------------------------


def unextended():
    return jacext.unextend(jacext.extend(mlp())), nn.Identity()


def head_not_extended():
    return jacext.extend(mlp()), nn.Linear(3, 2)  # the trainable head runs outside the extended module


def never_extended():
    return mlp(), nn.Identity()


SETUPS = {"unextended": unextended, "head_not_extended": head_not_extended, "never_extended": never_extended}


@pytest.mark.parametrize(
    "setup,make",
    [
        pytest.param(SETUPS[s], EXTENSIONS[e], id=f"{s}-{e}")
        for s in SETUPS
        for e in EXTENSIONS
        if (s, e) != ("never_extended", "BatchGrad")  # in test_api
    ],
)
def test_model_not_extended_is_a_clear_error(setup, make):
    model, head = setup()
    with backpack(make()), pytest.raises(jacext.JacextError, match=r"jacext\.extend\(model\)"):
        head(model(torch.randn(2, 4))).sum().backward()
    assert nothing_left_behind() and all(p.grad is None for p in model.parameters())


def test_frozen_module_that_is_not_extended_is_fine():
    """A frozen teacher inside the context needs no extension."""
    model, teacher = jacext.extend(mlp()), mlp().requires_grad_(False)
    x = torch.randn(3, 4)
    with backpack(ClipGrad(1.0, loss_reduction="sum")):
        (model(x) - teacher(x)).square().sum().backward()
    assert all(p.per_sample_l2.shape == (3,) for p in model.parameters())




@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_forward_outside_the_context_is_a_clear_error(make):
    model = jacext.extend(mlp())
    ext = make()
    with backpack(ext):
        model(torch.randn(4, 4)).sum().backward()
    out = model(torch.randn(2, 4))
    with backpack(ext), pytest.raises(jacext.JacextError, match="context"):
        out.square().sum().backward()


# --- BatchNorm in train mode with no explicit choice -----------------------------------------


def batchnorm_net():
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_batchnorm_train_without_choice_changes_nothing(make):
    """The error (test_batchnorm_train checks its wording) comes before the model's own backward:
    no p.grad, no attribute; after model.eval() the same model works."""
    model = jacext.extend(batchnorm_net())
    ext = make()
    x = torch.randn(6, 4)
    with backpack(ext):
        with pytest.raises(jacext.JacextError, match=r"'1'.*batchnorm='eval'"):
            model(x).sum().backward()
        assert untouched(model, ext) and nothing_left_behind()
        model.eval()
        model(x).sum().backward()
    assert all(getattr(p, ext.savefield).shape[0] == 6 for p in model.parameters())


def test_batchnorm_train_without_choice_in_jacobian_leaves_the_model_as_it_was():
    model = batchnorm_net()
    with pytest.raises(jacext.JacextError, match="batchnorm='eval'"):
        jacext.jacobian(model, torch.randn(6, 4))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_jacext") for m in model.modules() for k in vars(m))
    assert all(p.grad is None for p in model.parameters()) and nothing_left_behind()


# --- shapes and dtypes -----------------------------------------------------------------------


class Unpack(nn.Module):
    """The first output of a module that returns a tuple (GRU, MultiheadAttention)."""

    def __init__(self, inner, *, attention=False):
        super().__init__()
        self.inner, self.attention = inner, attention

    def forward(self, x):
        return (self.inner(x, x, x) if self.attention else self.inner(x))[0]


UNBATCHED = {  # (model, an input torch accepts without a batch dimension)
    "Linear": (lambda: nn.Linear(4, 3), lambda: torch.randn(4)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3), lambda: torch.randn(2, 5, 5)),
    "LayerNorm": (lambda: nn.LayerNorm(4), lambda: torch.randn(4)),
    "Embedding": (lambda: nn.Embedding(5, 3), lambda: torch.tensor(2)),
    "GRU": (lambda: Unpack(nn.GRU(3, 2, batch_first=True)), lambda: torch.randn(5, 3)),
    "MultiheadAttention": (lambda: Unpack(nn.MultiheadAttention(4, 2), attention=True), lambda: torch.randn(5, 4)),
}


@pytest.mark.parametrize(
    "layer,make",
    [pytest.param(layer, EXTENSIONS[e], id=f"{layer}-{e}") for layer in UNBATCHED for e in EXTENSIONS],
)
def test_input_without_batch_dimension_is_a_clear_error(layer, make):
    """Refused as the forward records it (rules with a min_dim), or at the latest in the backward
    before the model's own (GRU), so that p.grad and the attributes stay untouched."""
    build, data = UNBATCHED[layer]
    model = jacext.extend(build())
    ext = make()
    with backpack(ext):
        with pytest.raises(jacext.JacextError, match=rf"{layer} got an (unbatched )?input of shape .*batch dimension"):
            model(data()).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()


@pytest.mark.parametrize(
    "x", [torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3, 4))], ids=["float64", "int64"]
)
def test_input_of_another_dtype_is_torchs_error_and_leaves_nothing_behind(x):
    model = jacext.extend(mlp())
    with backpack(jacext.BatchGrad()):
        with pytest.raises(RuntimeError, match="dtype"):
            model(x)
        assert nothing_left_behind()
        model(x.float()).sum().backward()
    assert model[0].weight.grad_batch.shape == (3, 5, 4)


def test_integer_regression_targets_give_the_results_of_float_targets():
    model = mlp().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4, 3))
    expected = loop_grad_batch(model, nn.MSELoss(), y.double(), x)
    jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        nn.MSELoss()(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], torch.float64, name)


def test_targets_of_the_wrong_dtype_are_torchs_error_and_change_nothing():
    model = jacext.extend(mlp())
    with backpack(jacext.BatchGrad()), pytest.raises(RuntimeError, match="target"):
        nn.CrossEntropyLoss()(model(torch.randn(3, 4)), torch.tensor([0.0, 1.0, 2.0])).backward()
    assert untouched(model, jacext.BatchGrad()) and nothing_left_behind()


class Reduced(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.lin, self.how = nn.Linear(4, 3), how

    def forward(self, x):
        out = self.lin(x)
        return {"scalar": out.sum(), "mean": out.mean(0), "transposed": out.T, "flat": out.reshape(-1)}[self.how]




@pytest.mark.parametrize(
    "how,make",
    [pytest.param("scalar", EXTENSIONS[e], id=f"scalar-{e}") for e in EXTENSIONS]
    + [
        pytest.param(how, EXTENSIONS[e], id=f"{how}-{e}")
        for how in ("mean", "transposed", "flat")
        for e in ("BatchJacobian", "ClipGrad")
    ],
)
def test_output_that_is_not_n_by_anything_is_a_clear_error(how, make):
    """The extended module must return (N, ...) (docs/index.md); a model that reduces, moves or
    flattens the batch dimension gets an error naming the output's shape. (BatchGrad and
    BatchL2Grad take the samples from the layers' inputs and return per-sample gradients there.)"""
    model = jacext.extend(Reduced(how))
    ext = make()
    with backpack(ext):
        with pytest.raises(jacext.JacextError, match=r"shape \(.*\).*batch"):
            model(torch.randn(5, 4)).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()


# --- backward called twice -------------------------------------------------------------------

LOSSES = {
    "cross_entropy": lambda out: nn.CrossEntropyLoss(reduction="sum")(out, torch.tensor([0, 1, 2, 0])),
    "sum": lambda out: out.sum(),  # saves no tensor: the second backward gets as far as jacext
}


@pytest.mark.parametrize("loss", LOSSES.values(), ids=LOSSES.keys())
@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_second_backward_without_retain_graph_is_torchs_error_and_changes_nothing(make, loss):
    """p.grad stays that of the first backward; the attributes stay the first backward's (or,
    where jacext clears them on an error, are gone for every parameter)."""
    model = jacext.extend(mlp())
    ext = make()
    with backpack(ext):
        value = loss(model(torch.randn(4, 4)))
        value.backward()
        first = snapshot(model, ext.savefield)
        with pytest.raises(RuntimeError, match="second time"):
            value.backward()
    kept = [hasattr(p, ext.savefield) for p in model.parameters()]
    assert all(kept) or not any(kept), "some attributes were removed, others kept"
    for (attr, grad), p in zip(first, model.parameters()):  # the first backward's, or none at all
        assert torch.equal(p.grad, grad) and (
            not hasattr(p, ext.savefield) or torch.equal(getattr(p, ext.savefield), attr)
        )
    assert nothing_left_behind()


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_second_backward_with_retain_graph_replaces_the_attributes(make):
    """p.grad accumulates as torch's does; the attributes are those of this backward, not a sum."""
    model = jacext.extend(mlp())
    ext = make()
    with backpack(ext):
        value = LOSSES["cross_entropy"](model(torch.randn(4, 4)))
        value.backward(retain_graph=True)
        first = snapshot(model, ext.savefield)
        value.backward()
    for (attr, grad), p in zip(first, model.parameters()):
        torch.testing.assert_close(getattr(p, ext.savefield), attr)
        torch.testing.assert_close(p.grad, 2 * grad)


# --- exceptions ------------------------------------------------------------------------------


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, h, fail):
        if fail:
            raise ValueError("boom")
        return h * self.scale


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.inner, self.head = nn.Linear(4, 5), Raises(), nn.Linear(5, 3)

    def forward(self, x, fail=False):
        return self.head(self.inner(self.lin(x), fail))


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_exception_in_a_submodule_forward_leaves_nothing_behind(make):
    model = jacext.extend(Nested()).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    ext = make()
    with backpack(ext):
        with pytest.raises(ValueError, match="boom"):
            model(x, fail=True)
        assert nothing_left_behind()
        nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    if ext.savefield == "grad_batch":
        expected = loop_grad_batch(model, nn.CrossEntropyLoss(reduction="sum"), y, x)
        for name, p in model.named_parameters():
            assert_close(p.grad_batch, expected[name], torch.float64, name)
    assert all(getattr(p, ext.savefield).shape[0] == 3 for p in model.parameters())


def test_exception_in_the_forward_of_jacobian_leaves_the_model_as_it_was():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Nested()

        def forward(self, x):
            return self.net(x, fail=True)

    model = Failing()
    with pytest.raises(ValueError, match="boom"):
        jacext.jacobian(model, torch.randn(2, 4))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_jacext") for m in model.modules() for k in vars(m))
    assert nothing_left_behind()


class Branching(nn.Module):
    """Data-dependent control flow: the generic rule (torch.func) cannot serve it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale if bool((x > 0).all()) else 2 * x * self.scale


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_rule_that_fails_in_the_backward_changes_nothing(make):
    """test_api checks the error's wording; here: no p.grad and no attribute afterwards."""
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3), Branching()))
    ext = make()
    with backpack(ext), pytest.raises(jacext.JacextError, match=r"'1' \(Branching\)"):
        model(torch.randn(2, 2)).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()


def tapes_of(model):
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Tape and o.root is model]




@pytest.mark.parametrize(
    "where",
    cases(in_the_forward="forward", in_the_loss="loss", nowhere=""),
)
def test_no_tape_outlives_the_context(where):
    """Once the context is left (by an exception or normally) and the user holds no output, no
    tape of the model remains: nothing holds on to the batch's activations."""
    model = jacext.extend(Nested())

    def step():
        with backpack(jacext.BatchGrad()):
            out = model(torch.randn(3, 4), fail=where == "forward")
            if where == "loss":
                nn.CrossEntropyLoss()(out, torch.tensor([0, 1]))  # 2 targets for 3 samples
            out.sum().backward()

    try:
        step()
        raised = False
    except ValueError:
        raised = True
    assert raised == (where != "")
    assert not tapes_of(model) and nothing_left_behind()


@pytest.mark.parametrize(
    "exts,build,options",
    [
        pytest.param((ClipGrad(1.0, "sum"), ClipGrad(2.0, "sum")), mlp, {}, id="two_ClipGrad"),
        pytest.param((ClipGrad(1.0, "sum"),), batchnorm_net, {"batchnorm": "exact"}, id="ClipGrad_batchnorm_exact"),
    ],
)
def test_clip_grad_it_cannot_serve_is_an_error_before_anything_is_set(exts, build, options):
    model = jacext.extend(build(), **options)
    with backpack(*exts), pytest.raises(jacext.JacextError, match="exactly one"):
        model(torch.randn(4, 4)).sum().backward()
    assert untouched(model, exts[0]) and nothing_left_behind()


# --- results of the previous batch -----------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, use_b=True):
        return self.a(x) + self.b(x) if use_b else self.a(x)


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_parameter_unused_in_this_pass_gets_zeros_not_the_previous_values(make):
    model = jacext.extend(Branchy())
    ext = make()
    with backpack(ext):
        model(torch.randn(4, 4)).sum().backward()
        model(torch.randn(2, 4), use_b=False).square().sum().backward()
    for p in model.b.parameters():
        value = getattr(p, ext.savefield)
        assert value.shape[0] == 2 and not value.any()




@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_parameter_frozen_since_the_previous_pass_keeps_no_stale_attribute(make):
    """test_api: a frozen parameter gets no attribute; that holds for one frozen in between too."""
    model = jacext.extend(Branchy())
    ext = make()
    with backpack(ext):
        model(torch.randn(4, 4)).sum().backward()
        model.b.requires_grad_(False)
        model(torch.randn(2, 4)).square().sum().backward()
    assert not any(hasattr(p, ext.savefield) for p in model.b.parameters())


KEPT = {
    "tensor": lambda t: t,
    "view": lambda t: t[0],
    "numpy": lambda t: t.numpy(),
    "list": lambda t: [t],
}


@pytest.mark.parametrize("keep", KEPT.values(), ids=KEPT.keys())
@pytest.mark.parametrize("make", cases(**{k: v for k, v in EXTENSIONS.items() if k in ("BatchGrad", "BatchJacobian")}))
def test_results_the_user_kept_are_not_overwritten_by_the_next_backward(make, keep):
    """A result the user holds (the tensor, a view, a numpy array, in a container) keeps the
    values of its batch, even where the next results have the same shape."""
    model = jacext.extend(mlp())
    ext = make()
    kept, values = [], []
    for _ in range(2):  # same shapes: the next results could reuse the memory of the previous ones
        with backpack(ext):
            model(torch.randn(4, 4)).square().sum().backward()
        kept.append([keep(getattr(p, ext.savefield)) for p in model.parameters()])
        values.append([getattr(p, ext.savefield).clone() for p in model.parameters()])
    for held, value in zip(kept[0], values[0]):
        assert torch.equal(as_tensor(held), as_tensor(keep(value)))
    assert not all(torch.equal(a, b) for a, b in zip(values[0], values[1]))


def as_tensor(held):
    return torch.as_tensor(held[0] if isinstance(held, list) else held)




@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_two_forward_passes_in_one_backward_are_an_error_or_all_samples(make):
    """Either a clear error, or the results of the N1 + N2 samples, as for the concatenated batch."""
    model = jacext.extend(mlp()).double()
    x1, x2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    ext = make()
    with backpack(ext):
        value = model(x1).square().sum() + model(x2).square().sum()
        try:
            value.backward()
        except jacext.JacextError:
            return
    assert all(getattr(p, ext.savefield).shape[0] == 6 for p in model.parameters())
    if ext.savefield == "grad_batch":
        expected = loop_grad_batch(model, lambda out, y: out.square().sum(), None, torch.cat([x1, x2]))
        for name, p in model.named_parameters():
            assert_close(p.grad_batch, expected[name], torch.float64, name)


# --- empty batch and a single sample ---------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.gn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.GroupNorm(1, 3)
        self.head = nn.Linear(3 * 16, 2)

    def forward(self, x):
        return self.head(self.gn(self.bn(self.conv(x)).relu()).flatten(1))


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm = nn.Embedding(7, 4), nn.LSTM(4, 4, batch_first=True)
        self.attn, self.norm, self.head = (
            nn.MultiheadAttention(4, 2, batch_first=True),
            nn.LayerNorm(4),
            nn.Linear(4, 2),
        )

    def forward(self, x):
        h = self.lstm(self.emb(x))[0]
        return self.head(self.norm(self.attn(h, h, h)[0]).mean(1))


NETS = {  # (model in float64, input of N samples, extend's options)
    "conv_bn_eval": (lambda: ConvNet().double().eval(), lambda n: torch.randn(n, 2, 4, 4, dtype=torch.float64), {}),
    "conv_bn_exact": (
        lambda: ConvNet().double(),
        lambda n: torch.randn(n, 2, 4, 4, dtype=torch.float64),
        {"batchnorm": "exact"},
    ),
    "embedding_lstm_attention": (lambda: SeqNet().double(), lambda n: torch.randint(0, 7, (n, 5)), {}),
}


def mse_sum(out, y):
    return nn.MSELoss(reduction="sum")(out, y)


@pytest.mark.parametrize("net", [k for k in NETS if k != "conv_bn_exact"])
def test_empty_batch_through_every_layer_kind(net):
    build, data, options = NETS[net]
    model, x = build(), data(0)
    y = torch.zeros(0, 2, dtype=torch.float64)
    jacext.extend(model, **options)
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad(), jacext.BatchL2Grad()):
        mse_sum(model(x), y).backward()
    for p in model.parameters():
        assert p.jacobian.shape == (0, 2, *p.shape) and p.grad_batch.shape == (0, *p.shape)
        assert p.batch_l2.shape == (0,) and torch.equal(p.grad, torch.zeros_like(p))
    model.zero_grad()
    with backpack(ClipGrad(1.0, loss_reduction="mean")):
        mse_sum(model(x), y).backward()
    assert all(p.per_sample_l2.shape == (0,) and not p.grad.any() for p in model.parameters())
    jac = jacext.jacobian(model, x)
    assert all(jac[name].shape == (0, 2, *p.shape) for name, p in model.named_parameters())
    assert jacext.jacobian(model, x, flat=True).shape == (0, 2, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("net", NETS)
def test_single_sample(net):
    build, data, options = NETS[net]
    model, x = build(), data(1)
    y = torch.randn(1, 2, dtype=torch.float64)
    expected_jac = loop_jacobian(model, x)
    expected = loop_grad_batch(model, mse_sum, y, x)
    jacext.extend(model, **options)
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad()):
        mse_sum(model(x), y).backward()
    model.zero_grad()
    with backpack(jacext.BatchL2Grad()):
        mse_sum(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected_jac[name], torch.float64, f"jacobian of {name}")
        assert_close(p.grad_batch, expected[name], torch.float64, f"grad_batch of {name}")
        assert_close(p.batch_l2, expected[name].flatten(1).square().sum(1), torch.float64, f"batch_l2 of {name}")
    if options:  # ClipGrad refuses coupled samples (test_clip_grad_it_cannot_serve...)
        return
    norm = sum(g.square().sum() for g in expected.values()).sqrt()
    model.zero_grad()
    with backpack(ClipGrad(0.5 * norm.item(), loss_reduction="mean")):
        mse_sum(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, 0.5 * expected[name][0] * norm / (norm + 1e-6), torch.float64, f"clipped grad of {name}")
