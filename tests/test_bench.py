"""Smoke test of ``python -m jacext.bench``: tiny sizes, structure of the tables and JSON; no timings."""

import json
import sys

from jacext.bench.__main__ import main
from jacext.bench.registry import methods_for

HEADER = "| method | median time | × plain | × fastest peer | peak extra memory | max diff vs jacext |"


def test_quick_run_tables_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = main(["--quick", "--workloads", "transformer", "mlp-jacobian", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))

    header = report["header"]
    assert header["torch"] and header["threads"] >= 1
    assert len(header["loadavg_before"]) == len(header["loadavg_after"]) == 3

    out = capsys.readouterr().out
    assert out.count(HEADER) == 2
    assert [w["name"] for w in report["workloads"]] == ["transformer", "mlp-jacobian"]
    for workload in report["workloads"]:
        rows = {r["method"]: r for r in workload["rows"]}
        assert list(rows) == [m.name for m in methods_for(workload["quantity"])]
        assert rows["plain forward+backward"]["ratio_plain"] == 1
        for row in rows.values():
            assert f"| {row['method']} |" in out
            if not row["available"]:
                assert row["reason"] and row["median_s"] is None
                continue
            assert row["median_s"] > 0 and row["ratio_fastest_peer"] > 0
            assert row["peak_extra_mib"] is not None
            if row["family"] != "plain":
                assert row["max_diff"] is not None and not row["mismatch"], row
    transformer = {r["method"]: r for r in report["workloads"][0]["rows"]}
    assert not transformer["BackPACK BatchGrad"]["available"]  # BackPACK has no LayerNorm


def test_missing_peer_is_reported_not_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus now raises ImportError
    report = main(["--quick", "--workloads", "mlp", "--no-memory"])
    rows = {r["method"]: r for r in report["workloads"][0]["rows"]}
    assert "opacus not importable" in rows["Opacus GradSampleModule"]["reason"]
    assert rows["jacext BatchGrad"]["median_s"] > 0
