"""``fsmoe simulate`` and ``fsmoe reproduce`` run in-process through the CLI and write their files; bad input is
one line on stderr and exit status 2, with nothing written."""

from __future__ import annotations

import json

import pytest

from fsmoe.cli import main
from fsmoe.config import load_toml
from fsmoe.sim.build import sim_layout
from fsmoe.sim.reproduce import TOLERANCE, WHY
from fsmoe.sim.simulator import simulate

SMALL = ["--model", "mixtral-tiny", "--cluster", "testbed-b", "--nodes", "2", "--gpus-per-node", "2"]


def test_simulate_prints_writes_results_job_and_traces(tmp_path, capsys) -> None:
    out = tmp_path / "sim"
    rc = main(["simulate", *SMALL, "--sim-schedules", "tutel", "fsmoe", "--out", str(out),
               "--trace", str(tmp_path / "trace.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mixtral-tiny on testbed-b: 4 GPUs (2 x 2), E=4, EP=2, ESP=2, MP=2" in printed
    assert "(r_fwd, r_bwd) per block:" in printed and "blocks 0-" in printed
    data = json.loads((out / "simulation.json").read_text())
    job = load_toml(out / "job.toml")
    assert job.sim.schedules == ("tutel", "fsmoe") and job.model.name == "mixtral-tiny"
    expected = simulate(sim_layout(job), ("tutel", "fsmoe"))
    assert [r["schedule"] for r in data["runs"]] == ["tutel", "fsmoe"]
    assert data["runs"][1]["iteration_s"] == pytest.approx(expected.run("fsmoe").iteration_s, rel=1e-12)
    assert data["layout"]["ep"] == 2 and len(data["runs"][0]["degrees"]) == 4
    for schedule in ("tutel", "fsmoe"):
        events = json.loads((tmp_path / f"trace.{schedule}.json").read_text())["traceEvents"]
        end = max(e["ts"] + e["dur"] for e in events) / 1e6
        assert end == pytest.approx(expected.run(schedule).iteration_s, rel=1e-9)


def test_one_schedule_traces_to_the_file_named(tmp_path) -> None:
    assert main(["simulate", *SMALL, "--sim-schedules", "fsmoe", "--out", str(tmp_path / "o"),
                 "--trace", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text())["traceEvents"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "tiny"], "moe_every=2"),
    (["--cluster", "nowhere.json"], "'nowhere.json' is neither a preset"),
    (["--model", "mixtral-tiny", "--cluster", "testbed-b", "--nodes", "3", "--gpus-per-node", "2"],
     "E=4 experts do not split over EP=3"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv: list, message: str) -> None:
    out = tmp_path / "never"
    assert main(["simulate", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsmoe simulate: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_reproduce_writes_the_report_plots_and_results(tmp_path, capsys) -> None:
    out = tmp_path / "rep"
    assert main(["reproduce", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reproduce: Table 5" in printed and "testbed-b fsmoe over tutel" in printed
    for name in ("report.md", "results.json", "job.toml", "table5.png", "fig6.png", "fig7.png", "scale.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    rows = {(c["experiment"], c["item"]): c for c in data["comparisons"]}
    assert rows[("Table 5", "testbed-b fsmoe over tutel")]["paper"] == 1.22
    assert rows[("§4.5", "testbed-b configs with r_fwd != r_bwd (of 1458)")]["paper"] == 912
    for c in data["comparisons"]:  # every speedup off by more than the tolerance says why
        assert c["diff"] == pytest.approx(c["ours"] - c["paper"])
        off = c["kind"] == "speedup" and abs(c["diff"]) > TOLERANCE
        assert (c["why"] in WHY.values()) if off else c["why"] == ""
    report = (out / "report.md").read_text()
    assert "## Table 2" in report and "## Scale study" in report and "![fig7.png](fig7.png)" in report
    assert len(data["scale"]) == 2 and data["scale"][0]["gpus"][0] == 16 and data["scale"][0]["gpus"][-1] == 1024


def test_a_previous_result_is_replaced_only_with_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", *SMALL, "--sim-schedules", "fsmoe", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "simulation.json").read_text()
    capsys.readouterr()
    assert main([*argv, "--sim-schedules", "tutel"]) == 2
    assert "holds a previous result (simulation.json); pass --overwrite" in capsys.readouterr().err
    assert (out / "simulation.json").read_text() == before  # untouched
    assert main([*argv, "--sim-schedules", "tutel", "--overwrite"]) == 0
    assert json.loads((out / "simulation.json").read_text())["runs"][0]["schedule"] == "tutel"


def test_a_trace_that_cannot_be_written_stops_before_anything_is_written(tmp_path, capsys) -> None:
    out = tmp_path / "sim"
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = ["simulate", *SMALL, "--sim-schedules", "fsmoe", "--out", str(out)]
    assert main([*argv, "--trace", str(blocker / "t.json")]) == 2
    assert "cannot write --trace" in capsys.readouterr().err and not out.exists()
    trace = tmp_path / "t.json"
    trace.write_text("{}")
    assert main([*argv, "--trace", str(trace)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and not out.exists()
