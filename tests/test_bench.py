"""Smoke test of ``python -m benchmarks``: tiny sizes, structure of the tables and JSON; no timings.
``benchmarks.gpu_check``: what runs without a GPU (nothing), and its parts on the CPU at tiny sizes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.__main__ import main
from benchmarks.peers import MEMORY_LIMIT_GIB
from benchmarks.registry import method_named, methods_for
from benchmarks.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent

HEADER = "| method | median time | × plain | × fastest peer | peak extra memory | max diff vs jacext |"


def check_report(report: dict, out: str, names: list, memory: bool = True) -> dict:
    """The common structure of a quick report; ``{workload: {method: row}}``."""
    assert out.count(HEADER) == len(names)
    assert [w["name"] for w in report["workloads"]] == names
    tables = {}
    for workload in report["workloads"]:
        rows = {r["method"]: r for r in workload["rows"]}
        assert list(rows) == [m.name for m in methods_for(workload["quantity"])]
        assert rows["plain forward+backward"]["ratio_plain"] == 1
        for row in rows.values():
            assert f"| {row['method']} |" in out
            if row["family"] == "jacext":  # jacext does every workload, checked against a reference
                assert row["available"] and row["compared_with"], row
            if not row["available"]:
                assert row["reason"] and row["median_s"] is None
                continue
            assert row["median_s"] > 0 and row["ratio_fastest_peer"] > 0
            assert (row["peak_extra_mib"] is not None) == memory
            if row["family"] != "plain":
                assert row["max_diff"] is not None and not row["mismatch"], row
        tables[workload["name"]] = rows
    return tables


def test_quick_run_tables_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = main(["--quick", "--workloads", "transformer", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))

    header = report["header"]
    assert header["torch"] and header["threads"] >= 1
    assert len(header["loadavg_before"]) == len(header["loadavg_after"]) == 3

    tables = check_report(report, capsys.readouterr().out, ["transformer"])
    assert not tables["transformer"]["BackPACK BatchGrad"]["available"]  # BackPACK has no LayerNorm


def test_quick_norms(capsys):
    names = ["mlp-norms", "cnn-norms", "transformer-norms"]
    report = main(["--quick", "--workloads", *names, "--no-memory"])
    tables = check_report(report, capsys.readouterr().out, names, memory=False)
    for rows in tables.values():
        assert rows["jacext BatchL2Grad"]["compared_with"] == "naive per-sample loop"
        for method in ["torch.func vmap(grad) + norms", "Opacus ghost clipping (norms, 1 backward)"]:
            assert rows[method]["compared_with"] == "jacext BatchL2Grad"
    assert not tables["transformer-norms"]["BackPACK BatchL2Grad"]["available"]  # no LayerNorm


def test_quick_resnet_and_lstm(capsys):
    names = ["resnet18", "lstm"]
    report = main(["--quick", "--workloads", *names, "--no-memory"])
    tables = check_report(report, capsys.readouterr().out, names, memory=False)
    assert tables["lstm"]["Opacus GradSampleModule"]["available"]  # nn.LSTM -> DPLSTM by ModuleValidator.fix


def test_quick_jacobian_and_ntk(capsys):
    names = ["mlp-jacobian", "ntk-trace", "ntk-full", "ntk-trace-1024", "ntk-full-1024"]
    report = main(["--quick", "--workloads", *names, "--no-memory"])
    tables = check_report(report, capsys.readouterr().out, names, memory=False)
    assert tables.pop("mlp-jacobian")["jacext BatchJacobian"]["compared_with"] == "naive per-sample loop"
    for rows in tables.values():
        assert rows["jacext.ntk"]["compared_with"] == "torch.func Jacobian contraction"
        nngeometry = rows["nngeometry GramMatrix"]  # n/a where nngeometry (the bench extra) is missing
        assert nngeometry["compared_with"] == ("jacext.ntk" if nngeometry["available"] else "")


@pytest.mark.parametrize("name", ["ntk-full-1024", "ntk-trace-1024"])
def test_torch_func_ntk_over_memory_limit_is_not_run(name):
    case = WORKLOADS[name].build(quick=False)  # builds the MLP and 1024 inputs only
    with pytest.raises(Exception, match=f"GiB \\(> {MEMORY_LIMIT_GIB:.0f} GiB\\)"):
        method_named("torch.func Jacobian contraction").setup(case)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's hooks on the first layer
@pytest.mark.parametrize("name", ["mlp-norms", "transformer-norms"])
def test_clipped_gradients_agree(name):
    """jacext's ClipGrad and Opacus's two-pass ghost clipping leave the same clipped sum in p.grad."""
    case = WORKLOADS[name].build(quick=True)
    grads = []
    for method in [
        "jacext.dp.ClipGrad (norms + clipped grad)",
        "Opacus ghost clipping (norms + clipped grad, 2 backward)",
    ]:
        prepared = method_named(method).setup(case)
        norms = prepared.run()[0]
        assert norms.shape == (case.x.shape[0],) and (norms > 1).any()  # some samples are clipped
        grads.append([p.grad for p in prepared.model.parameters()])
    for ours, opacus in zip(*grads, strict=True):
        torch.testing.assert_close(ours, opacus, rtol=1e-5, atol=1e-6)


def test_missing_peer_is_reported_not_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus now raises ImportError
    report = main(["--quick", "--workloads", "mlp", "mlp-norms", "--no-memory"])
    rows = {r["method"]: r for r in report["workloads"][0]["rows"]}
    assert "opacus not importable" in rows["Opacus GradSampleModule"]["reason"]
    assert rows["jacext BatchGrad"]["median_s"] > 0
    norms = {r["method"]: r for r in report["workloads"][1]["rows"]}
    assert "opacus not importable" in norms["Opacus ghost clipping (norms, 1 backward)"]["reason"]


def test_scaling_quick_writes_json_and_plot(tmp_path):
    from benchmarks import scaling

    report = scaling.main(["--quick", "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(json.dumps(report))
    assert [s["name"] for s in report["sweeps"]] == ["batch", "outputs", "width"]
    for sweep in report["sweeps"]:
        assert [p["value"] for p in sweep["points"]] == sweep["values"]
        for point in sweep["points"]:
            assert set(point["median_s"]) == set(sweep["methods"]) and min(point["median_s"].values()) > 0
            assert point["max_diff_jacext_vs_peer"] <= 1e-4 * max(1.0, point["max_abs_peer"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the GPU checks where there is a CUDA device")
def test_gpu_check_without_cuda_runs_nothing(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "no CUDA device: nothing run\n"
    assert not out.exists()


@pytest.mark.parametrize("name", gpu_check.GPU_WORKLOADS)
def test_gpu_workloads_build_and_step_on_the_cpu(name):
    """Every GPU workload, at its quick size on the CPU: one forward and backward of the summed loss."""
    case = WORKLOADS[name].build(quick=True, device="cpu")
    assert case.x.device.type == "cpu" and all(p.device.type == "cpu" for p in case.model.parameters())
    case.loss(case.model(case.x), case.y).backward()
    assert all(p.grad is not None for p in case.model.parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's hooks on the first layer
def test_gpu_benchmark_parts_on_the_cpu(capsys):
    """The GPU run's loop, targets and markdown on the CPU at tiny sizes: the DP step on the decoder in
    float32 and under bfloat16 autocast, and a workload skipped once the budget is spent."""
    results, skipped = gpu_check.run_benchmark(
        ["gpt2-dp"], ["float32", "bfloat16"], time.perf_counter() + 60, 1, 0.01, device="cpu", quick=True, memory=False
    )
    late, over = gpu_check.run_benchmark(["mlp"], ["float32"], time.perf_counter(), 1, 0.01, device="cpu", quick=True)
    assert not skipped and not late and over == ["mlp, float32: over the time budget"]
    assert [r["precision"] for r in results] == ["float32", "bfloat16 autocast"]
    for result in results:
        rows = {r["method"]: r for r in result["rows"]}
        assert list(rows) == [m.name for m in methods_for("dp-step")]
        ours = rows["jacext.dp.ClipGrad (1 backward)"]
        assert ours["available"] and ours["compared_with"] == "naive per-sample loop" and not ours["mismatch"]
        for row in rows.values():
            assert not row["available"] or not row["mismatch"], row
    float32 = {r["method"]: r for r in results[0]["rows"]}
    assert all(r["available"] and r["compared_with"] for r in float32.values() if r["family"] == "peer")

    report = {
        "header": {
            "command": "python -m benchmarks.gpu_check",
            "date": "today",
            "device": "CPU",
            "cuda": None,
            "torch": torch.__version__,
            "python": "3",
            "versions": {},
            "repeats": 1,
            "min_run_time": 0.01,
        },
        "parts_s": {"benchmark": 1.0},
        "tests": None,
        "workloads": results,
        "skipped": over,
        "targets": gpu_check.targets(results),
    }
    step_targets = ["≤ 1.2× the plain step", "peak memory ≤ 1.05× the plain step's"]
    assert [(t["precision"], t["target"]) for t in report["targets"]] == [
        (p, t) for p in ["float32", "bfloat16 autocast"] for t in step_targets
    ]
    assert report["targets"][0]["measured"] > 0 and report["targets"][1]["met"] is None  # no memory measured
    text = gpu_check.markdown(report)
    assert text.count("| method | median time |") == 2 and "- mlp, float32: over the time budget" in text


def test_gpu_check_stops_its_tests_at_the_budget(tmp_path):
    log = tmp_path / "pytest.txt"
    tests = gpu_check.run_tests(0.5, log)
    assert tests["timed_out"] and tests["returncode"] is None and log.exists()


def test_dp_step_clips():
    """On the quick decoder some samples are clipped, so the DP step differs from the plain gradient."""
    case = WORKLOADS["gpt2-dp"].build(quick=True)
    prepared = method_named("jacext.dp.ClipGrad (1 backward)").setup(case)
    clipped = prepared.run()
    norms = torch.stack([p.per_sample_l2 for p in prepared.model.parameters()]).sum(0).sqrt()
    assert norms.shape == (3,) and (norms > 1).any()
    case.loss(case.model(case.x), case.y).backward()
    assert any(not torch.allclose(c, p.grad) for c, p in zip(clipped, case.model.parameters(), strict=True))


def _real_models_checked(names: list, capsys) -> dict:
    """A quick run of real-model workloads: jacext matches the naive loop, torch.func matches jacext,
    and "× fastest peer" divides by the fastest peer whose result matches."""
    report = main(["--quick", "--workloads", *names, "--no-memory"])
    out = capsys.readouterr().out
    assert out.count(HEADER) == len(names)
    tables = {}
    for workload in report["workloads"]:
        rows = {r["method"]: r for r in workload["rows"]}
        for row in rows.values():
            if row["family"] == "jacext":
                assert row["compared_with"] == "naive per-sample loop" and not row["mismatch"], row
        peers = [r["median_s"] for r in rows.values() if r["family"] == "peer" and r["available"] and not r["mismatch"]]
        ours = next(r for r in rows.values() if r["family"] == "jacext")
        assert ours["ratio_fastest_peer"] == pytest.approx(ours["median_s"] / min(peers))
        tables[workload["name"]] = rows
    return tables


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus's hooks, vmap's fallback for attention
def test_quick_real_models_transformers(capsys):
    pytest.importorskip("transformers")
    tables = _real_models_checked(["bert", "gpt2-dp-step", "llama"], capsys)
    for name in ["bert", "llama"]:
        vmap = tables[name]["torch.func vmap(grad)"]
        assert vmap["compared_with"] == "jacext BatchGrad" and not vmap["mismatch"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_real_models_timm(capsys):
    pytest.importorskip("timm")
    tables = _real_models_checked(["vit", "vit-dp-step"], capsys)
    assert not tables["vit"]["torch.func vmap(grad)"]["mismatch"]


def test_real_models_group():
    from benchmarks.__main__ import parse
    from benchmarks.real_models import ADDED, REAL_MODELS

    assert parse(["--workloads", "real-models", "mlp"]).workloads == [*REAL_MODELS, "mlp"]
    default = parse([]).workloads
    assert "resnet18" in default and not {w.name for w in ADDED} & set(default)
