"""DP-SGD on scikit-learn's digits with jacext: per-sample clipping inside the backward pass.

Poisson-sampled batches (Opacus's DPDataLoader), ``jacext.dp.ClipGrad`` (per-sample gradient
norms without per-sample gradients in memory, p.grad = clipped sum), ``jacext.optim.DPSGD``
(Gaussian noise, SGD step) and Opacus's RDP accountant for the epsilon spent.

    python examples/dp_digits.py [--epochs 10] [--noise-multiplier 1.0] [--max-grad-norm 1.0]
"""

import argparse

import torch
from backpack import backpack
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import jacext
from jacext.dp import ClipGrad, epsilon
from jacext.optim import DPSGD


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="expected batch size of the Poisson sampling")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = TensorDataset(x[:1500], y[:1500]), (x[1500:], y[1500:])
    loader = DPDataLoader.from_data_loader(
        DataLoader(train, batch_size=args.batch_size), generator=torch.Generator().manual_seed(0)
    )
    sample_rate = 1 / len(loader)

    model = jacext.extend(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)))
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    accountant = RDPAccountant()
    opt = DPSGD(
        model.parameters(), lr=args.lr, momentum=0.9, noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm, expected_batch_size=args.batch_size, sample_rate=sample_rate,
        accountant=accountant, generator=torch.Generator().manual_seed(1),
    )
    for epoch in range(1, args.epochs + 1):
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False)
        for xb, yb in bar:
            opt.zero_grad()
            with backpack(ClipGrad(args.max_grad_norm, loss_reduction="sum")):
                loss = lossfunc(model(xb), yb)
                loss.backward()
            opt.step()
            bar.set_postfix(batch=len(yb), loss=f"{loss.item() / max(len(yb), 1):.3f}")
        with torch.no_grad():
            acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
        eps = epsilon(accountant, args.delta)
        print(f"epoch {epoch}: test accuracy {acc:.3f}, epsilon {eps:.2f} (delta {args.delta})")


if __name__ == "__main__":
    main()
