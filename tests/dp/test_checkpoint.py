"""save_checkpoint / load_checkpoint: a resumed run continues on the same trajectory (noise,
Poisson batches, optimizer state, adaptive clipping bound) with the same epsilon."""

import pytest
import torch
from dp_cases import ADAPTIVE, FILTERS, dataset, make_model
from torch import nn
from torch.utils.data import DataLoader

import jacext
from jacext.dp import PrivacyEngine

pytestmark = [pytest.mark.filterwarnings(f) for f in FILTERS]
pytest.importorskip("opacus")


def setup(clipping, batch_size=3):
    model = make_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    extra = ADAPTIVE if clipping == "adaptive" else {}
    private, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(dataset("mlp", n_batches=3), batch_size=batch_size),
        noise_multiplier=0.8, max_grad_norm=2.0, clipping=clipping, noise_generator=torch.Generator().manual_seed(9),
        **extra,
    )
    return model, private, opt, loader, engine


def epoch(private, opt, loader):
    for x, y in loader:
        opt.zero_grad()
        nn.CrossEntropyLoss()(private(x), y).backward()
        opt.step()


@pytest.mark.parametrize("clipping", ["flat", "adaptive"])
def test_checkpoint_resumes_the_same_trajectory_and_epsilon(clipping, tmp_path):
    torch.manual_seed(123)
    model, private, opt, loader, engine = setup(clipping)
    epoch(private, opt, loader)
    engine.save_checkpoint(path=tmp_path / "ckpt.pt", module=private, optimizer=opt, checkpoint_dict={"epoch": 1})
    epoch(private, opt, loader)
    epoch(private, opt, loader)
    expected = {k: p.detach().clone() for k, p in model.named_parameters()}
    expected_c, expected_eps = opt.max_grad_norm, engine.get_epsilon(1e-5)

    torch.manual_seed(456)  # another global state: the checkpoint restores what the run draws from
    model2, private2, opt2, loader2, engine2 = setup(clipping)
    rest = engine2.load_checkpoint(path=tmp_path / "ckpt.pt", module=private2, optimizer=opt2)
    assert rest == {"epoch": 1}
    epoch(private2, opt2, loader2)
    epoch(private2, opt2, loader2)
    for k, p in model2.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=0, atol=0)
    assert opt2.max_grad_norm == expected_c
    assert engine2.get_epsilon(1e-5) == expected_eps
    if clipping == "adaptive":
        assert expected_c != 2.0


def test_checkpoint_with_another_sample_rate_is_refused(tmp_path):
    _, private, opt, _, engine = setup("flat")
    engine.save_checkpoint(path=tmp_path / "ckpt.pt", module=private, optimizer=opt)
    _, private2, opt2, _, engine2 = setup("flat", batch_size=6)
    with pytest.raises(jacext.JacextError, match="sample rate"):
        engine2.load_checkpoint(path=tmp_path / "ckpt.pt", module=private2, optimizer=opt2)
