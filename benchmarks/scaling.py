"""How jacext's cost grows: ``python -m benchmarks.scaling [--threads 1] [--quick]``.

Three sweeps on the MLP ``d_in``-width-width-C of the benchmark, each point timed like the
benchmark (interleaved ``blocked_autorange`` rounds, :func:`benchmarks.timing.interleaved`)
for the plain forward+backward pass, the best peer (torch.func) and jacext:

- ``batch``: per-sample gradients against the batch size N (width 512, C = 10);
- ``outputs``: per-sample Jacobians against the number of outputs C (width 512, N = 16);
- ``width``: per-sample gradients against the hidden width (N = 64, C = 10).

Before timing, each point runs every method once and records the largest difference between
jacext's and the peer's results. Writes the numbers as JSON and a plot (matplotlib, Agg) of the
times and of their ratio to the plain pass.
"""

import argparse
import json
import os
import statistics
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.registry import method_named
from benchmarks.report import header
from benchmarks.timing import add_timing_arguments, interleaved, torch_threads
from benchmarks.workloads import Case, mlp

PLAIN = "plain forward+backward"
D_IN = 784


@dataclass(frozen=True)
class Sweep:
    """One parameter varied, the others fixed; ``methods`` as named in the registry."""

    name: str
    label: str  # the x axis
    quantity: str
    values: Sequence[int]
    fixed: Dict[str, int]  # the other parameters: batch, outputs, width
    methods: Sequence[str]


def sweeps(quick: bool) -> List[Sweep]:
    grad = [PLAIN, "torch.func vmap(grad)", "jacext BatchGrad", "jacext BatchGrad, memory reused"]
    jac = [PLAIN, "torch.func vmap(jacrev)", "jacext BatchJacobian", "jacext BatchJacobian, memory reused"]
    if quick:
        return [
            Sweep("batch", "batch size N", "grad", [2, 4], {"outputs": 3, "width": 8}, grad),
            Sweep("outputs", "outputs C", "jacobian", [1, 3], {"batch": 2, "width": 8}, jac),
            Sweep("width", "hidden width", "grad", [4, 8], {"batch": 2, "outputs": 3}, grad),
        ]
    return [
        Sweep("batch", "batch size N", "grad", [16, 32, 64, 128, 256], {"outputs": 10, "width": 512}, grad),
        Sweep("outputs", "outputs C", "jacobian", [1, 2, 4, 8, 16, 32], {"batch": 16, "width": 512}, jac),
        Sweep("width", "hidden width", "grad", [64, 128, 256, 512, 1024], {"batch": 64, "outputs": 10}, grad),
    ]


def build(quantity: str, batch: int, outputs: int, width: int, quick: bool) -> Case:
    torch.manual_seed(0)
    d_in = 20 if quick else D_IN
    model = mlp(d_in, width, outputs)
    x, y = torch.randn(batch, d_in), torch.randint(0, outputs, (batch,))
    return Case(model, x, y, torch.nn.CrossEntropyLoss(reduction="sum"), quantity)


def _max_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def measure(sweep: Sweep, value: int, quick: bool, repeats: int, min_run_time: float) -> dict:
    """One point: median seconds per method (and every round's), and jacext's difference to the peer."""
    sizes = {**sweep.fixed, sweep.name: value}
    case = build(sweep.quantity, sizes["batch"], sizes["outputs"], sizes["width"], quick)
    runs: Dict[str, Callable[[], object]] = {}
    results: Dict[str, List[torch.Tensor]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sweep.methods:
            prepared = method_named(name).setup(case)
            runs[name] = prepared.run
            result = prepared.standard(prepared.run())  # checked once, then dropped
            if result is not None:
                results[name] = result
    peer, ours = sweep.methods[1], sweep.methods[2]
    max_diff = _max_diff(results[ours], results[peer])
    largest = max(r.abs().max().item() for r in results[peer])
    results.clear()
    samples = interleaved(runs, repeats, min_run_time)
    return {
        "value": value,
        "sizes": sizes,
        "parameters": sum(p.numel() for p in case.model.parameters()),
        "max_diff_jacext_vs_peer": max_diff,
        "max_abs_peer": largest,
        "median_s": {name: statistics.median(s) for name, s in samples.items()},
        "samples_s": samples,
    }


def run(quick: bool, repeats: int, min_run_time: float, log=print) -> List[dict]:
    out = []
    for sweep in sweeps(quick):
        points = []
        for value in sweep.values:
            point = measure(sweep, value, quick, repeats, min_run_time)
            points.append(point)
            times = ", ".join(f"{name} {t * 1e3:.3g} ms" for name, t in point["median_s"].items())
            log(f"{sweep.name}={value}: {times} (max diff {point['max_diff_jacext_vs_peer']:.1e})")
        out.append({**vars(sweep), "values": list(sweep.values), "methods": list(sweep.methods), "points": points})
    return out


def plot(report: dict, path: str) -> None:
    """Times (top) and ratios to the plain pass (bottom) against each sweep's parameter, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, NullFormatter

    class decimal(LogFormatter):
        """The ticks a LogFormatter labels, written as plain decimals (0.5, 20, 100)."""

        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    results = report["sweeps"]
    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 7), squeeze=False)
    styles = {
        0: ("tab:gray", "s", ":"),
        1: ("tab:blue", "o", "--"),
        2: ("tab:red", "^", "-"),
        3: ("tab:orange", "v", "-"),
    }
    for col, sweep in enumerate(results):
        x = [p["value"] for p in sweep["points"]]
        top, bottom = axes[0][col], axes[1][col]
        for i, name in enumerate(sweep["methods"]):
            color, marker, line = styles[i]
            times = [p["median_s"][name] * 1e3 for p in sweep["points"]]
            top.plot(x, times, marker=marker, linestyle=line, color=color, label=name)
            if name != PLAIN:
                ratios = [p["median_s"][name] / p["median_s"][PLAIN] for p in sweep["points"]]
                bottom.plot(x, ratios, marker=marker, linestyle=line, color=color, label=name)
        fixed = ", ".join(f"{k} {v}" for k, v in sweep["fixed"].items())
        kind = "per-sample gradients" if sweep["quantity"] == "grad" else "per-sample Jacobians"
        top.set_title(f"{kind}\n({fixed})", fontsize=10)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(x, [str(v) for v in x])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(decimal(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(decimal(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        top.set_ylabel("median time per call (ms)")
        bottom.set_ylabel("× plain forward+backward")
        bottom.set_xlabel(sweep["label"])
    h = report["header"]
    fig.suptitle(
        f"MLP {D_IN if not h['quick'] else 20}-width-width-C, float32, torch {h['torch']}, "
        f"{h['threads']} thread(s), {h['cpu']}, {h['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="docs/img/scaling.json", metavar="PATH", help="%(default)s")
    parser.add_argument("--plot", default="docs/img/scaling.png", metavar="PATH", help="%(default)s")
    add_timing_arguments(parser, min_run_time=0.2)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    with torch_threads(args.threads or (1 if args.quick else None)):
        repeats = args.repeats or (1 if args.quick else 5)
        min_run_time = args.min_run_time or (0.01 if args.quick else 0.2)
        report: dict = {
            "header": {
                **header(argv),
                "command": " ".join(["python -m benchmarks.scaling", *argv]),
                "quick": args.quick,
                "repeats": repeats,
                "min_run_time": min_run_time,
            }
        }
        report["sweeps"] = run(args.quick, repeats, min_run_time)
        report["header"]["loadavg_after"] = list(os.getloadavg())
    for path in (args.json, args.plot):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return report


if __name__ == "__main__":
    main()
