"""What Opacus 1.6 does with models that jacext.dp clips as they are (the claims of the table in
docs/dp.md): nn.LSTM and nn.MultiheadAttention, tied weights, a head tied functionally.

Per-sample gradients of Opacus's GradSampleModule against an autograd loop over samples, in
float64. Run: ``python examples/dp_opacus_limits.py`` (needs opacus).
"""

import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

sys.path[:0] = [str(Path(__file__).parents[1] / "tests"), str(Path(__file__).parents[1] / "tests" / "dp")]
from dp_cases import N, inputs, make_model, per_sample_gradients  # noqa: E402


class FunctionalTied(nn.Module):
    """An output layer that is the embedding's weight, used through F.linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.emb(tokens).mean(1)), self.emb.weight)


def case(name, g):
    if name == "functional_tied":
        torch.manual_seed(0)
        return FunctionalTied().double(), torch.randint(0, 7, (N, 4), generator=g), 7
    return make_model(name), inputs(name, N, g), 7 if name == "tied" else 3


def main():
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    for name in ["lstm", "transformer", "tied", "functional_tied"]:
        model, x, classes = case(name, g)
        y = torch.randint(0, classes, (N,), generator=g)
        errors = [type(e).__name__ for e in ModuleValidator.validate(model, strict=False)]
        print(f"{name}: ModuleValidator: {errors or 'no error'}")
        try:
            gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
            nn.CrossEntropyLoss(reduction="sum")(gsm(x), y).backward()
        except Exception as error:  # noqa: BLE001 - report what Opacus raises
            print(f"  GradSampleModule: {type(error).__name__}: {str(error)[:80]}")
            continue
        expected = per_sample_gradients(model, x, y, "sum")
        for k, p in gsm._module.named_parameters():
            gs = getattr(p, "grad_sample", None)
            err = "no grad_sample" if gs is None else f"max |error| {float((gs - expected[k]).abs().max()):.3g}"
            print(f"  {k}: {err}")
    fixed = ModuleValidator.fix(make_model("transformer"))
    keys = sorted(set(fixed.state_dict()) - set(make_model("transformer").state_dict()))
    print(f"ModuleValidator.fix(transformer): {type(fixed.enc.layers[0].self_attn).__name__}, new keys {keys[:2]}...")


if __name__ == "__main__":
    main()
