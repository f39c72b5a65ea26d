"""Smoke test of ``python -m jacext.bench``: tiny sizes, structure of the tables and JSON; no timings."""

import json
import sys

import pytest
import torch

from jacext.bench.__main__ import main
from jacext.bench.peers import MEMORY_LIMIT_GIB
from jacext.bench.registry import method_named, methods_for
from jacext.bench.workloads import WORKLOADS

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
    report = main(["--quick", "--workloads", "transformer", "mlp-jacobian", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))

    header = report["header"]
    assert header["torch"] and header["threads"] >= 1
    assert len(header["loadavg_before"]) == len(header["loadavg_after"]) == 3

    tables = check_report(report, capsys.readouterr().out, ["transformer", "mlp-jacobian"])
    assert not tables["transformer"]["BackPACK BatchGrad"]["available"]  # BackPACK has no LayerNorm


def test_quick_norms(capsys):
    names = ["mlp-norms", "cnn-norms", "transformer-norms"]
    tables = check_report(main(["--quick", "--workloads", *names]), capsys.readouterr().out, names)
    for rows in tables.values():
        assert rows["jacext BatchL2Grad"]["compared_with"] == "naive per-sample loop"
        for method in ["torch.func vmap(grad) + norms", "Opacus ghost clipping (norms, 1 backward)"]:
            assert rows[method]["compared_with"] == "jacext BatchL2Grad"
    assert not tables["transformer-norms"]["BackPACK BatchL2Grad"]["available"]  # no LayerNorm


def test_quick_resnet_and_lstm(capsys):
    names = ["resnet18", "lstm"]
    tables = check_report(main(["--quick", "--workloads", *names]), capsys.readouterr().out, names)
    assert tables["lstm"]["Opacus GradSampleModule"]["available"]  # nn.LSTM -> DPLSTM by ModuleValidator.fix


def test_quick_ntk(capsys):
    names = ["ntk-trace", "ntk-full", "ntk-trace-1024", "ntk-full-1024"]
    report = main(["--quick", "--workloads", *names, "--no-memory"])
    tables = check_report(report, capsys.readouterr().out, names, memory=False)
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
    for ours, opacus in zip(*grads):
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
    from jacext.bench import scaling

    report = scaling.main(["--quick", "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(json.dumps(report))
    assert [s["name"] for s in report["sweeps"]] == ["batch", "outputs", "width"]
    for sweep in report["sweeps"]:
        assert [p["value"] for p in sweep["points"]] == sweep["values"]
        for point in sweep["points"]:
            assert set(point["median_s"]) == set(sweep["methods"]) and min(point["median_s"].values()) > 0
            assert point["max_diff_jacext_vs_peer"] <= 1e-4 * max(1.0, point["max_abs_peer"])
