"""Every state that would lose the privacy guarantee is refused, with an error that says what to do."""

import importlib.util
import math

import pytest
import torch
from backpack import backpack
from dp_cases import ADAPTIVE, F64, FILTERS, N, dataset, fixed_loader, make_model
from torch import nn

import jacext
from jacext.dp import DPSGD, BatchMemoryManager, ClipGrad, PerLayerClipGrad, PrivacyEngine

pytestmark = [pytest.mark.filterwarnings(f) for f in FILTERS]
pytest.importorskip("opacus")

LOSS = nn.CrossEntropyLoss()


def private_mlp(**options):
    model = make_model("mlp")
    data = dataset("mlp")
    engine = PrivacyEngine(accountant="rdp")
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    args.update(options)
    private, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=fixed_loader(data), **args
    )
    x, y = data.tensors[0][:N], data.tensors[1][:N]
    return model, private, opt, loader, engine, x, y


def test_unclipped_backward_of_the_wrapped_model_is_refused():
    model, private, opt, *_, x, y = private_mlp()
    opt.zero_grad()
    LOSS(model(x), y).backward()  # the original model, not the private one
    with pytest.raises(jacext.JacextError, match="outside the private model's clipping"):
        opt.step()


def test_loss_mixing_private_and_direct_calls_is_refused():
    model, private, opt, *_, x, y = private_mlp()
    opt.zero_grad()
    (LOSS(private(x), y) + LOSS(model(x), y)).backward()
    with pytest.raises(jacext.JacextError, match="direct call of the wrapped model"):
        opt.step()


def test_another_clipgrad_on_the_wrapped_model_is_refused():
    model, private, opt, *_, x, y = private_mlp()
    opt.zero_grad()
    with backpack(ClipGrad(1.0)):
        LOSS(model(x), y).backward()
    with pytest.raises(jacext.JacextError):
        opt.step()


def test_a_second_clipping_around_the_private_model_is_refused():
    _, private, *_, x, y = private_mlp()
    with pytest.raises(jacext.JacextError, match="second clipping"):
        with backpack(ClipGrad(1.0)):
            private(x)


def test_two_backward_passes_in_one_step_are_refused():
    _, private, opt, *_, x, y = private_mlp()
    opt.zero_grad()
    LOSS(private(x), y).backward()
    LOSS(private(x), y).backward()
    with pytest.raises(jacext.JacextError, match="sums 2 backward passes"):
        opt.step()


def test_a_step_on_the_last_steps_gradients_is_refused():
    _, private, opt, *_, x, y = private_mlp()
    opt.zero_grad()
    LOSS(private(x), y).backward()
    opt.step()
    with pytest.raises(jacext.JacextError, match="not been cleared since the last optimizer step"):
        opt.step()
    LOSS(private(x), y).backward()  # onto the noisy gradient of the step
    with pytest.raises(jacext.JacextError, match="onto those of the last optimizer step"):
        opt.step()
    opt.zero_grad()
    LOSS(private(x), y).backward()
    opt.step()


def test_gradients_set_by_hand_are_refused():
    model, _, opt, *_ = private_mlp()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(jacext.JacextError, match="not produced by a backward pass"):
        opt.step()


def test_a_bound_changed_between_backward_and_step_is_refused():
    _, private, opt, *_, x, y = private_mlp()
    opt.zero_grad()
    LOSS(private(x), y).backward()
    opt.max_grad_norm = 0.5
    with pytest.raises(jacext.JacextError, match="clipped with max_grad_norm 1.0"):
        opt.step()


@pytest.mark.parametrize("bound", [0.0, -1.0, math.nan, math.inf, "1"])
def test_bad_max_grad_norm_is_refused(bound):
    with pytest.raises(ValueError, match="max_grad_norm"):
        private_mlp(max_grad_norm=bound)
    with pytest.raises(ValueError, match="max_grad_norm"):
        ClipGrad(bound)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPSGD(make_model("mlp").parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=bound, expected_batch_size=4)


def test_bad_per_layer_bounds_are_refused():
    with pytest.raises(ValueError, match="one max_grad_norm per trainable parameter"):
        private_mlp(clipping="per_layer", max_grad_norm=[1.0, 1.0])
    with pytest.raises(ValueError, match="max_grad_norm"):
        private_mlp(clipping="per_layer", max_grad_norm=[1.0, math.nan, 1.0, 1.0])


@pytest.mark.parametrize("sigma", [-1.0, math.nan, math.inf])
def test_bad_noise_multiplier_is_refused(sigma):
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_mlp(noise_multiplier=sigma)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPSGD(make_model("mlp").parameters(), lr=0.1, noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=4)
    _, _, opt, *_ = private_mlp()
    with pytest.raises(ValueError, match="noise_multiplier"):
        opt.noise_multiplier = sigma


def test_bad_adaptive_clipping_is_refused():
    with pytest.raises(ValueError, match="2 \\* unclipped_num_std"):
        private_mlp(clipping="adaptive", noise_multiplier=2.5, **ADAPTIVE)
    with pytest.raises(ValueError, match="needs unclipped_num_std"):
        private_mlp(clipping="adaptive", **{k: v for k, v in ADAPTIVE.items() if k != "unclipped_num_std"})
    with pytest.raises(ValueError, match="max_clipbound > min_clipbound"):
        private_mlp(clipping="adaptive", **{**ADAPTIVE, "min_clipbound": 200.0})


def test_a_criterion_with_another_reduction_is_refused():
    with pytest.raises(ValueError, match="reduces with 'sum'"):
        private_mlp(criterion=nn.CrossEntropyLoss(reduction="sum"), loss_reduction="mean")


def test_two_engines_on_one_model_are_refused():
    model, private, opt, *_ = private_mlp()
    data = dataset("mlp")
    with pytest.raises(jacext.JacextError, match="already"):
        PrivacyEngine().make_private(module=private, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=fixed_loader(data), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(jacext.JacextError, match="another private module"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=fixed_loader(data), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(jacext.JacextError, match="already privatised"):
        DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    private._close()
    opt._close()
    PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=fixed_loader(data), noise_multiplier=1.0, max_grad_norm=1.0)


def test_a_loader_with_another_sample_rate_is_refused():
    from opacus.data_loader import DPDataLoader

    model = make_model("mlp")
    data = dataset("mlp", n_batches=4)
    engine = PrivacyEngine(accountant="rdp")
    _, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=fixed_loader(data), noise_multiplier=1.0, max_grad_norm=1.0)
    assert engine.sample_rate == 0.25
    other = DPDataLoader(data, sample_rate=0.5)
    with pytest.raises(jacext.JacextError, match="samples at rate 0.5"):
        BatchMemoryManager(data_loader=other, max_physical_batch_size=2, optimizer=opt)
    with pytest.raises(jacext.JacextError, match="does not sample Poisson batches"):
        BatchMemoryManager(data_loader=fixed_loader(data), max_physical_batch_size=2, optimizer=opt)
    BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt)


def test_per_layer_clipgrad_refuses_a_backward_it_cannot_clip_per_layer():
    model = jacext.extend(make_model("lstm"))
    data = dataset("lstm")
    clip = PerLayerClipGrad({p: 1.0 for p in model.parameters()}, loss_reduction="sum")
    with backpack(clip):
        out = model(data.tensors[0][:N])
    with pytest.raises(jacext.JacextError, match="per-layer clipping"):
        nn.CrossEntropyLoss(reduction="sum")(out, data.tensors[1][:N]).backward()


def test_an_empty_batch_steps_with_noise_only():
    model, private, opt, *_, x, y = private_mlp(noise_generator=torch.Generator().manual_seed(5))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    LOSS(private(x[:0]), y[:0]).backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    for p, b in zip(model.parameters(), before, strict=False):
        noise = torch.normal(mean=0, std=1.0, size=p.shape, generator=gen, dtype=F64)
        torch.testing.assert_close(p.detach(), b - 0.1 * noise / N, rtol=1e-12, atol=1e-14)


def test_dpsgd_refuses_unclipped_and_differently_clipped_gradients():
    model = jacext.extend(make_model("mlp"))
    data = dataset("mlp")
    x, y = data.tensors[0][:N], data.tensors[1][:N]
    opt = DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=N)
    LOSS(model(x), y).backward()
    with pytest.raises(jacext.JacextError, match="no jacext ClipGrad ran"):
        opt.step()
    opt.zero_grad()
    with backpack(ClipGrad(2.0)):
        LOSS(model(x), y).backward()
    with pytest.raises(jacext.JacextError, match="max_grad_norm 2.0 ran"):
        opt.step()
    opt.zero_grad()
    with backpack(ClipGrad(1.0)):
        LOSS(model(x), y).backward()
    opt.step()
    with backpack(ClipGrad(1.0)):  # without zero_grad: onto the noisy gradient
        LOSS(model(x), y).backward()
    with pytest.raises(jacext.JacextError):
        opt.step()


def test_dpsgd_made_after_the_backward_reads_the_clipgrad_stamp():
    """As in the DDP tests: the optimizer made after the clipped backward pass; the same
    gradients are refused for a second step."""
    model = jacext.extend(make_model("mlp"))
    data = dataset("mlp")
    x, y = data.tensors[0][:N], data.tensors[1][:N]
    with backpack(ClipGrad(1.0)):
        LOSS(model(x), y).backward()
    DPSGD(model.parameters(), lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=N).step()
    with pytest.raises(jacext.JacextError, match="used by an earlier step"):
        DPSGD(model.parameters(), lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=N).step()
    with pytest.raises(jacext.JacextError, match="max_grad_norm 1.0 ran"):
        model.zero_grad()
        with backpack(ClipGrad(1.0)):
            LOSS(model(x), y).backward()
        DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=3.0, expected_batch_size=N).step()


def test_a_layer_of_the_wrapped_model_called_directly_is_refused():
    model, private, opt, *_, x, y = private_mlp()
    opt.zero_grad()
    (LOSS(private(x), y) + model.net[0](x).square().sum()).backward()
    with pytest.raises(jacext.JacextError, match="direct call of the wrapped model"):
        opt.step()


def test_a_layer_recomputed_by_activation_checkpointing_is_not_a_direct_call():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=False))

    model = Checkpointed().to(F64)
    data = dataset("mlp")
    private, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=fixed_loader(data),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
    )
    x, y = next(iter(loader))
    opt.zero_grad()
    LOSS(private(x), y).backward()
    opt.step()


@pytest.mark.parametrize(
    "change",
    [
        lambda p: setattr(p, "grad", p.grad * 10),
        lambda p: p.grad.mul_(10),
        lambda p: torch.nn.utils.clip_grad_norm_([p], 1e-3),
    ],
    ids=["replaced", "in_place", "clip_grad_norm_"],
)
def test_gradients_changed_after_the_backward_are_refused(change):
    model, private, opt, *_, x, y = private_mlp()
    opt.zero_grad()
    LOSS(private(x), y).backward()
    change(model.net[2].weight)
    with pytest.raises(jacext.JacextError, match="replaced or changed in place after the clipped backward"):
        opt.step()


def test_an_accountant_without_sample_rate_is_refused():
    from opacus.accountants import RDPAccountant

    with pytest.raises(ValueError, match="needs the sample_rate"):
        DPSGD(make_model("mlp").parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
              accountant=RDPAccountant())


def test_secure_mode_says_what_it_is_and_refuses_a_seeded_generator():
    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng installed")
    with pytest.warns(UserWarning, match="torch has no cryptographically secure generator"):
        engine = PrivacyEngine(accountant="rdp", secure_mode=True)
    model = make_model("mlp")
    with pytest.raises(ValueError, match="prohibited in secure mode"):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=fixed_loader(dataset("mlp")), noise_multiplier=1.0, max_grad_norm=1.0,
                            noise_generator=torch.Generator().manual_seed(0))
