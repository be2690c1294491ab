"""pdtb compare: the comparison file's schema, the cells, the aggregation, and a tiny run end to end."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from core.config import ConfigError
from testbed.cli import main
from testbed.compare import (Cell, CellResult, STATUS_NOT_RUN, STATUS_OK, aggregate, cell_metrics, cell_scenario,
                             cells, load_comparison, run_comparison)

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "scenarios" / "compare-seed.yaml"


def write(tmp_path: Path, text: str, name: str = "cmp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TINY = """
kind: comparison
name: tiny
backend: {backend}
baseline: [gpu]
deployments:
  - {{name: gpu, scenario: {{topology: colocated, pools: {{colocated: {{hardware: h200x8}}}},
                            emulation: {{tdf: 5, byte_scale: 0.01}}}}}}
  - {{name: seed, scenario: {{topology: pair, kv_transfer: {{mode: layerwise}},
                             emulation: {{tdf: 10, byte_scale: 0.00390625}}}}}}
models: [llama-3.1-8b]
workloads:
  - {{name: short, workload: {{prompt_tokens: 512, output_tokens: 8}}, slo: {{ttft_ms: 2000, tpot_ms: 50}}}}
loads: [{loads}]
requests: {requests}
"""


def test_shipped_breakeven_comparison_is_valid():
    cmp = load_comparison(REPO / "scenarios" / "compare-breakeven.yaml")
    todo = cells(cmp)
    assert len(todo) == 2 * 2 * (2 + 5)  # models x workloads x (two baselines + five seed bandwidths)
    for c in todo:
        cell_scenario(cmp, c, 5)


def test_shipped_comparison_loads_and_every_cell_is_a_valid_scenario_or_says_why():
    cmp = load_comparison(SEED)
    all_cells = cells(cmp)
    assert {c.deployment for c in all_cells} == {"gpu-h100x8", "gpu-h200x8", "gpu-disagg", "trn2-colocated",
                                                 "cs3-only", "seed"}
    # only the seed is swept (3 bandwidths x 2 losses); the others run once per model, workload, load
    per_cell = 3 * 4 * 2
    assert len(all_cells) == per_cell * (5 + 6)
    assert len(cells(cmp, quick=True)) == 6 * 3 * 4 * 1  # every deployment, model and workload at one load
    not_fitting = []
    for c in all_cells:
        try:
            sc = cell_scenario(cmp, c, 10)
        except ConfigError as exc:
            not_fitting.append((c, str(exc)))
            continue
        assert sc.model == c.model and sc.workload.requests == 10
        if c.workload == "coding":  # the trace's rate is scaled to the load
            assert sc.workload.trace is not None and sc.workload.trace.speedup > 0
        else:
            assert sc.workload.arrival.rate == c.load
    # 405B (810 GB of BF16 weights) does not fit 8 x 80 GB H100s: said, not dropped
    assert {c.deployment for c, _ in not_fitting} == {"gpu-h100x8"}
    assert all(c.model == "llama-3.1-405b" and "do not fit" in msg for c, msg in not_fitting)


@pytest.mark.parametrize("text, problems", [
    ("kind: comparison\nname: x\nbaseline: []\ndeployments: []\nmodels: []\nworkloads: []\nloads: [0]\n",
     ["baseline", "deployments", "models", "workloads", "loads"]),
    ("kind: scenario\nname: x\n", ["kind: expected 'comparison'"]),
    ("kind: comparison\nname: x\nbaseline: [nope]\ndeployments: [missing.yaml, {name: a, scenario: {topology: pair}}]\nmodels: [llama-3.1-8b]\n"
     "workloads: [{name: w, workload: {requests: 3}, slo: {ttft_ms: 1, tpot_ms: 1}}]\nloads: [1]\n",
     ["deployments[0]: no deployment file 'missing.yaml'", "the comparison sets requests"]),
])
def test_bad_comparison_files_get_one_line_per_problem(tmp_path, text, problems):
    with pytest.raises(ConfigError) as exc:
        load_comparison(write(tmp_path, text))
    msg = str(exc.value)
    assert all(line.startswith(str(tmp_path / "cmp.yaml") + ":") for line in msg.splitlines())
    for p in problems:
        assert p in msg, (p, msg)


def test_deployment_may_not_set_the_workload(tmp_path):
    text = TINY.format(loads=1, requests=2, backend="local").replace("{name: gpu, scenario: {",
                                                    "{name: gpu, scenario: {model: llama-3.1-8b, ")
    with pytest.raises(ConfigError, match=r"deployments\[0\]: scenario: the comparison sets model, not a deployment$"):
        load_comparison(write(tmp_path, text))


def result(dep: str, load: float, e2e: float, verdict: str = "trustworthy", point: tuple = ()) -> CellResult:
    m = {"ttft_ms": {"p50": e2e / 10, "p90": e2e / 5}, "tpot_ms": {"p50": e2e / 100, "p90": e2e / 50},
         "e2e_ms": {"p50": e2e, "p90": 2 * e2e}, "tokens_per_s_per_user": {"p50": 1e5 / e2e, "p90": 2e5 / e2e},
         "goodput_share": 1.0, "completed": 5, "failed": 0, "verdict": verdict,
         "attribution_ms": {"queue": 1.0, "prefill": 2.0, "handoff_and_first_token": 3.0, "decode": e2e - 6}}
    return CellResult(Cell(dep, "llama-3.1-8b", "short", load, point), STATUS_OK, "", "", m)


def test_speedup_is_over_the_fastest_trusted_baseline_and_untrusted_cells_get_none(tmp_path):
    text = TINY.format(loads=1, requests=2, backend="local").replace("baseline: [gpu]", "baseline: [gpu, seed]")
    cmp = load_comparison(write(tmp_path, text))
    results = [result("gpu", 1, 400.0), result("seed", 1, 100.0),
               result("gpu", 2, 800.0, verdict="untrustworthy"), result("seed", 2, 200.0),
               CellResult(Cell("gpu", "llama-3.1-8b", "short", 3), STATUS_NOT_RUN, "does not fit")]
    doc = aggregate(cmp, results, "local", quick=False)
    by = {(c["deployment"], c["load"]): c for c in doc["cells"]}
    assert by[("gpu", 1)]["speedup"]["e2e_ms"] == pytest.approx(0.25)  # the seed is the faster baseline here
    assert by[("seed", 1)]["baseline"] == "seed" and by[("seed", 1)]["speedup"]["e2e_ms"] == 1.0
    assert by[("gpu", 2)]["trusted"] is False and by[("gpu", 2)]["speedup"] is None
    assert by[("seed", 2)]["baseline"] == "seed"  # the untrusted gpu cell is never the baseline
    assert by[("gpu", 3)]["status"] == STATUS_NOT_RUN and by[("gpu", 3)]["reason"] == "does not fit"


def test_unswept_baseline_stands_for_every_sweep_point(tmp_path):
    text = TINY.format(loads=1, requests=2, backend="local") + "sweep: {fabric.efa.loss: [0, 0.01]}\n"
    cmp = load_comparison(write(tmp_path, text))
    todo = cells(cmp)
    assert [(c.deployment, c.point) for c in todo] == [
        ("gpu", ()), ("seed", (("fabric.efa.loss", 0),)), ("seed", (("fabric.efa.loss", 0.01),))]
    doc = aggregate(cmp, [result("gpu", 1, 300.0), result("seed", 1, 100.0, point=todo[1].point),
                          result("seed", 1, 150.0, point=todo[2].point)], "local", quick=False)
    assert [c["speedup"]["e2e_ms"] for c in doc["cells"]] == pytest.approx([1.0, 3.0, 2.0])


def test_cell_metrics_from_a_summary_and_request_rows():
    summary = {"ttft_ms": {"p50": 10.0, "p90": 20.0}, "tpot_ms": {"p50": 1.0, "p90": 2.0},
               "e2e_ms": {"p50": 50.0, "p90": 90.0}, "goodput": {"share": 0.5},
               "counts": {"completed": 2, "failed": 1}, "fidelity": {"verdict": "trustworthy"}}
    rows = [{"completed": "True", "output_tokens": "11", "ttft_ms": "10", "e2e_ms": "20", "prefill_queue_ms": "2",
             "prefill_ms": "5"},
            {"completed": "True", "output_tokens": "21", "ttft_ms": "20", "e2e_ms": "60", "prefill_queue_ms": "4",
             "prefill_ms": "5"},
            {"completed": "False", "output_tokens": "0", "ttft_ms": "", "e2e_ms": "", "prefill_queue_ms": "",
             "prefill_ms": ""}]
    m = cell_metrics(summary, rows)
    # per-user speed: (11 - 1) / 10 ms = 1000 tok/s and (21 - 1) / 40 ms = 500 tok/s
    assert m["tokens_per_s_per_user"]["p50"] == pytest.approx(750.0)
    assert m["attribution_ms"] == pytest.approx({"queue": 3.0, "prefill": 5.0, "handoff_and_first_token": 7.0,
                                                 "decode": 25.0})
    assert m["verdict"] == "trustworthy" and m["goodput_share"] == 0.5


@pytest.mark.parametrize("backend", ["sim", "local"])
def test_tiny_comparison_end_to_end_writes_json_csv_and_html(tmp_path, backend):
    cmp_path = write(tmp_path, TINY.format(loads=2, requests=3, backend=backend))
    out = tmp_path / "out"
    rc = main(["compare", str(cmp_path), "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "comparison.json").read_text())
    assert [c["deployment"] for c in doc["cells"]] == ["gpu", "seed"]
    for c in doc["cells"]:
        assert c["status"] == STATUS_OK, c["reason"]
        assert c["completed"] == 3 and c["failed"] == 0
        assert c["ttft_ms"]["p50"] > 0 and c["tpot_ms"]["p50"] > 0
        assert (Path(c["run_dir"]) / "summary.json").is_file()
    with (out / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["deployment"] for r in rows] == ["gpu", "seed"]
    if backend == "sim":  # simulated cells are trusted: the seed's speedup over the GPU baseline is there
        seed = doc["cells"][1]
        assert seed["baseline"] == "gpu" and seed["speedup"]["tpot_ms"] > 5
    page = (out / "comparison.html").read_text()
    assert "<table>" in page and "data:image/png;base64" in page
    assert list(out.glob("compare_*.png"))
