"""Train a small CNN on scikit-learn's digits; each epoch, per-sample Jacobians and gradients with jacext.

Training records per-sample gradients in every step (their median norm is shown in the
progress bar). Each epoch, for a probe batch, the time jacext takes against a naive loop over
samples (and over the 10 outputs for the Jacobian), median of 3 interleaved runs, and the
largest difference between them.

    python examples/digits_cnn.py [--epochs 5] [--probe 64]
"""

import argparse
import statistics
import time

import torch
from backpack import backpack
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

import jacext


def data():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def naive(model, lossfunc, x, y):
    """The loop jacext replaces: one forward per sample, one backward per sample and output."""
    params = list(model.parameters())
    jac, grad = [], []
    for n in range(len(x)):
        out = model(x[n : n + 1])
        jac.append([torch.autograd.grad(out[0, c], params, retain_graph=True) for c in range(out.shape[1])])
        grad.append(torch.autograd.grad(lossfunc(out, y[n : n + 1]) / len(x), params))
    jac = [torch.stack([torch.stack([row[c][i] for c in range(len(row))]) for row in jac]) for i in range(len(params))]
    grad = [torch.stack([g[i] for g in grad]) for i in range(len(params))]
    return jac, grad


def with_jacext(model, lossfunc, x, y):
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad()):
        lossfunc(model(x), y).backward()
    return [p.jacobian for p in model.parameters()], [p.grad_batch for p in model.parameters()]


def interleaved(fns, args, repeats=3):
    """Median time of each function, runs interleaved; and each function's last result."""
    times: list[list[float]] = [[] for _ in fns]
    results = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn(*args)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--probe", type=int, default=64, help="samples in the per-epoch comparison batch")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = data()
    model = jacext.extend(cnn())
    lossfunc = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xp, yp = xte[: args.probe], yte[: args.probe]

    rows = []
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(ytr))
        bar = tqdm(range(0, len(ytr), args.batch_size), desc=f"epoch {epoch}", leave=False)
        for i in bar:
            idx = perm[i : i + args.batch_size]
            opt.zero_grad()
            with backpack(jacext.BatchGrad()):  # per-sample gradients in the same backward pass
                loss = lossfunc(model(xtr[idx]), ytr[idx])
                loss.backward()
            norms = sum(p.grad_batch.flatten(1).square().sum(1) for p in model.parameters()).sqrt()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", median_sample_grad_norm=f"{norms.median().item():.4f}")
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        (t_jx, t_loop), ((jac, grad), (jac_ref, grad_ref)) = interleaved(
            [with_jacext, naive], (model, lossfunc, xp, yp)
        )
        diff_j = max((a - b).abs().max().item() for a, b in zip(jac, jac_ref, strict=True))
        diff_g = max((a - b).abs().max().item() for a, b in zip(grad, grad_ref, strict=True))
        rows.append((epoch, loss.item(), acc, t_jx, t_loop, diff_j, diff_g))
        print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {acc:.3f}")

    print(f"\nPer-sample quantities for a probe batch of N={args.probe} (C=10 outputs):")
    print("| parameter | p.jacobian | p.grad_batch |\n|---|---|---|")
    for name, p in model.named_parameters():
        print(f"| {name} | {tuple(p.jacobian.shape)} | {tuple(p.grad_batch.shape)} |")
    print(
        "\n| epoch | loss | test acc | jacext (J + grads) [s] | naive loop [s] | speed-up "
        "| max abs diff J | max abs diff grad |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for e, loss, acc, t_jx, t_loop, dj, dg in rows:
        print(
            f"| {e} | {loss:.3f} | {acc:.3f} | {t_jx:.4f} | {t_loop:.3f} | {t_loop / t_jx:.0f}x "
            f"| {dj:.1e} | {dg:.1e} |"
        )


if __name__ == "__main__":
    main()
