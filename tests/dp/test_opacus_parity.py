"""Step for step with Opacus's PrivacyEngine: the same script, only the import changed, on
scikit-learn's digits and a small MLP, with the same seeds (Poisson sampling and noise from
torch's global generator, as Opacus draws them by default)."""

import pytest
import torch
from dp_cases import FILTERS
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jacext.dp

opacus = pytest.importorskip("opacus")
sklearn = pytest.importorskip("sklearn.datasets")

pytestmark = [pytest.mark.filterwarnings(f) for f in FILTERS] + [
    pytest.mark.filterwarnings("ignore::UserWarning:opacus"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def digits():
    d = sklearn.load_digits()
    x = torch.tensor(d.data[:600], dtype=torch.float64) / 16
    return TensorDataset(x, torch.tensor(d.target[:600]))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def script(Engine, data, *, steps, accountant="rdp", optimizer=torch.optim.SGD, clipping="flat", max_grad_norm=1.0,
           reduction="mean", physical=None, manager=None, **extra):
    """An Opacus training script; ``Engine`` is the only thing that changes."""
    model = mlp()
    opt = optimizer(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    engine = Engine(accountant=accountant)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=32), noise_multiplier=1.1,
        max_grad_norm=max_grad_norm, clipping=clipping, loss_reduction=reduction, **extra,
    )
    criterion = nn.CrossEntropyLoss(reduction=reduction)
    done = 0
    while done < steps:
        if physical is None:
            batches, ctx = loader, None
        else:
            ctx = manager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt)
            batches = ctx.__enter__()
        for x, y in batches:
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
            if not opt._is_last_step_skipped:
                done += 1
                if done == steps:
                    break
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return [p.detach().clone() for p in model.parameters()], engine


def assert_same(a, b, tol=1e-5):
    assert max((p - q).abs().max().item() for p, q in zip(a, b, strict=False)) < tol


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(reduction="sum"),
        dict(optimizer=torch.optim.Adam),
        dict(optimizer=torch.optim.AdamW),
        dict(clipping="per_layer", max_grad_norm=[0.5, 0.3, 0.5, 0.2]),
    ],
    ids=["sgd", "sum", "adam", "adamw", "per_layer"],
)
def test_same_trajectory_as_opacus(digits, case):
    ours, our_engine = script(jacext.dp.PrivacyEngine, digits, steps=25, **case)
    theirs, their_engine = script(opacus.PrivacyEngine, digits, steps=25, **case)
    assert_same(ours, theirs)
    assert our_engine.get_epsilon(1e-5) == their_engine.get_epsilon(1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_same_epsilon_from_each_accountant(digits, accountant):
    _, ours = script(jacext.dp.PrivacyEngine, digits, steps=5, accountant=accountant)
    _, theirs = script(opacus.PrivacyEngine, digits, steps=5, accountant=accountant)
    assert ours.accountant.history == theirs.accountant.history
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-9)


def test_adaptive_clipping_is_accounted_as_opacus_accounts_it(digits):
    """Both account adaptive clipping's steps with the noise multiplier as given (Andrew et al.'s
    Theorem 1: the gradient noise sigma_eff and the count's noise together spend what sigma would).
    The trajectories differ on purpose: Opacus divides the noisy unclipped count by the batch's
    actual size, which Poisson sampling keeps private; jacext by the expected size."""
    from dp_cases import ADAPTIVE

    _, ours = script(jacext.dp.PrivacyEngine, digits, steps=5, clipping="adaptive", **ADAPTIVE)
    _, theirs = script(opacus.PrivacyEngine, digits, steps=5, clipping="adaptive", **ADAPTIVE)
    assert ours.accountant.history == theirs.accountant.history == [(1.1, 1 / 19, 5)]
    assert ours.get_epsilon(1e-5) == theirs.get_epsilon(1e-5)


def test_make_private_with_epsilon_picks_opacus_noise(digits):
    args = dict(target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
    found = []
    for Engine in (jacext.dp.PrivacyEngine, opacus.PrivacyEngine):
        model = mlp()
        _, opt, _ = Engine(accountant="rdp").make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(digits, batch_size=32), **args,
        )
        found.append(opt.noise_multiplier)
    assert found[0] == found[1] > 0


def test_virtual_steps_equal_the_logical_batch(digits):
    """jacext's and Opacus's BatchMemoryManager on jacext's optimizer: physical batches of at most 8
    give the logical batches' trajectory and accounting (one step per logical batch)."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager as OpacusManager

    whole, engine = script(jacext.dp.PrivacyEngine, digits, steps=8)
    for manager in (jacext.dp.BatchMemoryManager, OpacusManager):
        split, split_engine = script(jacext.dp.PrivacyEngine, digits, steps=8, physical=8, manager=manager)
        assert_same(split, whole, 1e-12)
        assert split_engine.accountant.history == engine.accountant.history
    opacus_split, _ = script(opacus.PrivacyEngine, digits, steps=8, physical=8, manager=OpacusManager)
    assert_same(opacus_split, whole)


def test_physical_batches_are_bounded_and_the_noise_is_added_once(digits):
    model = mlp()
    torch.manual_seed(1)
    engine = jacext.dp.PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(digits, batch_size=32),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    sizes, steps = [], 0
    with jacext.dp.BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=opt) as physical:
        for x, y in physical:
            sizes.append(len(x))
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            opt.step()
            steps += not opt._is_last_step_skipped
    assert max(sizes) <= 5 and len(sizes) > steps
    assert sum(n for _, _, n in engine.accountant.history) == steps == len(loader)


def test_ghost_mode_returns_the_criterion_as_opacus(digits):
    model = mlp()
    criterion = nn.CrossEntropyLoss()
    out = jacext.dp.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=criterion,
        data_loader=DataLoader(digits, batch_size=32),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
    )
    assert len(out) == 4 and out[2] is criterion
