"""The empirical NTK of a small MLP on scikit-learn's digits: spectrum and kernel regression.

At initialisation, the MLP's empirical neural tangent kernel K(x, x') = J(x) J(x')^T is
computed with jacext (one forward and backward pass per batch of samples, contracted one
parameter at a time). Its eigenvalue spectrum (trace kernel, and the largest eigenvalues of
the full (N C, N C) kernel of the first training samples) is saved as a PNG; kernel ridge
regression with the trace kernel on one-hot targets classifies the test digits.

    python examples/ntk_digits.py [--train 500] [--test 300] [--width 128] [--out ntk_spectrum.png]
    python examples/ntk_digits.py --quick
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

from jacext.kernels import ntk, top_eigenvalues  # noqa: E402


def data(n_train, n_test):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:n_train], perm[n_train : n_train + n_test]
    return (x[train], y[train]), (x[test], y[test])


def mlp(width):
    layers = [nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)]
    return nn.Sequential(*layers).double()


def kernel_ridge(k_train, k_test, y_train, ridge):
    """Predictions K(test, train) (K(train, train) + ridge * mean diag K I)^{-1} (Y - 1/10)."""
    targets = nn.functional.one_hot(y_train, 10).double() - 0.1
    scale = k_train.diagonal().mean()
    coefficients = torch.linalg.solve(k_train + ridge * scale * torch.eye(len(k_train), dtype=k_train.dtype), targets)
    return (k_test @ coefficients).argmax(1)


def plot_spectrum(trace_values, full_values, full_rows, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(trace_values)
    ax.semilogy(range(1, n + 1), trace_values.clamp_min(1e-12), label=f"trace kernel ({n} x {n})")
    full_label = f"full kernel ({full_rows} x {full_rows}), largest"
    ax.semilogy(range(1, len(full_values) + 1), full_values, "o", ms=3, label=full_label)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Empirical NTK of an MLP on digits, at initialisation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=500, help="training samples (the kernel is train x train)")
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128, help="samples per Jacobian block")
    parser.add_argument("--full-samples", type=int, default=300, help="training samples in the full (N C, N C) kernel")
    parser.add_argument("--top", type=int, default=40, help="largest eigenvalues of the full kernel")
    parser.add_argument("--out", default="ntk_spectrum.png", help="where to save the spectrum plot")
    parser.add_argument("--quick", action="store_true", help="a reduced run: 150 train, 100 test, width 64")
    args = parser.parse_args()
    if args.quick:
        args.train, args.test, args.width, args.full_samples, args.top = 150, 100, 64, 60, 20

    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = data(args.train, args.test)
    model = mlp(args.width).eval()
    print(f"MLP 64-{args.width}-{args.width}-10, {sum(p.numel() for p in model.parameters())} parameters; "
          f"{args.train} training and {args.test} test digits")

    start = time.perf_counter()
    k_train = ntk(model, x_train, mode="trace", batch_size=args.batch_size)
    k_test = ntk(model, x_test, x_train, mode="trace", batch_size=args.batch_size)
    print(f"trace NTK: train x train {tuple(k_train.shape)} and test x train {tuple(k_test.shape)} "
          f"in {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    trace_values = torch.linalg.eigvalsh(k_train).flip(0)
    x_full = x_train[: args.full_samples]
    full_values = top_eigenvalues(model, x_full, args.top, mode="full", batch_size=args.batch_size)
    rows = len(x_full) * 10
    print(f"spectrum: all {len(trace_values)} eigenvalues of the trace kernel, {args.top} largest of the full "
          f"({rows} x {rows}) kernel in {time.perf_counter() - start:.2f} s")
    print(f"largest eigenvalues: trace {trace_values[0]:.4g}, full {full_values[0]:.4g}; "
          f"trace kernel condition number {trace_values[0] / trace_values[-1]:.3g}")
    plot_spectrum(trace_values, full_values, rows, args.out)
    print(f"saved {args.out}")

    for ridge in (1e-3, 1e-2, 1e-1):
        accuracy = (kernel_ridge(k_train, k_test, y_train, ridge) == y_test).double().mean().item()
        print(f"NTK ridge regression (trace kernel), ridge {ridge:g}: test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
