"""``fsmoe bench train``: configuration checks, the row list, the CLI flags, the summary arithmetic on
hand-made samples, and one quick run on 2 plain-loopback ranks whose first-step loss is checked against
a single-process model (and, where DeepSpeed is installed, against the DeepSpeed-MoE twin's). No timing
is asserted beyond "positive"."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fsmoe.bench import TrainBenchConfig, quick_train_config, run_train_bench
from fsmoe.bench.config import DEEPSPEED
from fsmoe.bench.train import add_train_parser, train_bench_config_from_args
from fsmoe.bench.train_rank import TrainRankResult
from fsmoe.bench.train_report import summarize_train
from fsmoe.models.gpt_moe import GPTMoE
from fsmoe.parallel.parallelize import reference_grid
from fsmoe.train.data import BatchSampler, load_corpus

REPO = Path(__file__).resolve().parents[2]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


# --- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ep": 3}, "ep*esp must divide world_size, got ep=3"),
        ({"batch_size": 6}, "global batch 6 is not divisible by the dense data-parallel degree 4"),
        ({"ep": 2, "esp": 4}, "esp=4 must divide procs_per_node=2"),
        ({"model": "huge"}, "unknown model preset 'huge'"),
        ({"schedules": ("fsmoe", "gpipe")}, "unknown schedule 'gpipe'"),
        ({"schedules": ()}, "at least one schedule"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"launcher": "ssh"}, "unknown launcher 'ssh'"),
        ({"link": "10mbps"}, "bytes/s"),
    ],
)
def test_config_refuses_with_the_numbers(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        TrainBenchConfig(**changes)


def test_rows_and_layouts() -> None:
    cfg = TrainBenchConfig(schedules=("sequential", "fsmoe"))
    assert [(i.name, i.layout) for i in cfg.impls()] == [
        ("sequential", "EP=4 ESP=1"), ("fsmoe r=2", "EP=4 ESP=1"), ("deepspeed", "EP=4 ESP=1")]
    assert cfg.tokens_per_step == 16 * 128
    # the model DeepSpeed can mirror: kept top-2 weights renormalised, like its top2gating
    assert cfg.model_config().moe.renormalize is True
    # ESP: our rows keep it; DeepSpeed and one EP-only partner per schedule run EP over the same 4 ranks
    esp = cfg.replace(ep=2, esp=2)
    assert [(i.name, i.layout) for i in esp.impls()] == [
        ("sequential", "EP=2 ESP=2"), ("fsmoe r=2", "EP=2 ESP=2"), ("sequential (EP=4 only)", "EP=4 ESP=1"),
        ("fsmoe r=2 (EP=4 only)", "EP=4 ESP=1"), ("deepspeed", "EP=4 ESP=1")]
    assert [i.name for i in esp.replace(include_deepspeed=False).impls()] == ["sequential", "fsmoe r=2"]
    assert esp.deepspeed_unable() is None
    assert "mp=1" in (cfg.replace(ep=2, mp=2).deepspeed_unable() or "")


def test_cli_flags_override_the_preset() -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="benchmark"))
    args = parser.parse_args(["train", "--quick", "--link", "200mbit", "--ep", "2", "--esp", "2", "--schedules",
                              "fsmoe", "--r-fwd", "4", "--no-deepspeed", "--steps", "5"])
    cfg = train_bench_config_from_args(args)
    assert cfg == quick_train_config(link="200mbit", ep=2, esp=2, schedules=("fsmoe",), r_fwd=4,
                                     include_deepspeed=False, steps=5)
    assert train_bench_config_from_args(parser.parse_args(["train"])) == TrainBenchConfig()


# --- the summary arithmetic, on hand-made samples ----------------------------------------------------------
def test_summary_tokens_per_s_and_ratios_come_from_the_medians() -> None:
    cfg = quick_train_config(nodes=1, procs_per_node=2, ep=2, schedules=("sequential", "fsmoe"))
    samples = {"sequential": [0.4, 0.2, 0.3], "fsmoe r=2": [0.25, 0.2, 0.1], DEEPSPEED: [0.5, 0.4, 0.6]}
    losses = {"sequential": [5.5, 5.0, 4.8, 4.7], "fsmoe r=2": [5.5, 5.0, 4.8, 4.7],
              DEEPSPEED: [5.50005, 5.0, 4.8, 4.6]}
    results = [TrainRankResult(rank=r, rows=list(samples), samples_s=samples, losses=losses, notes={}, skipped={})
               for r in range(2)]
    p = summarize_train(cfg, results, cluster={"description": "test", "shaped": True})
    rows = {r["name"]: r for r in p["implementations"]}
    tokens = 8 * 64
    assert p["tokens_per_step"] == tokens
    assert rows["fsmoe r=2"]["median_s"] == 0.2 and rows["fsmoe r=2"]["tokens_per_s"] == pytest.approx(tokens / 0.2)
    assert rows["sequential"]["deepspeed_over_this"] == pytest.approx(0.5 / 0.3)
    assert p["best_ours"] == "fsmoe r=2" and p["speedup_vs_deepspeed"] == pytest.approx(0.5 / 0.2)
    assert rows[DEEPSPEED]["loss_first"] == 5.50005 and rows[DEEPSPEED]["loss_last"] == 4.6
    check = p["initial_loss_check"]
    assert check["abs_diff"] == pytest.approx(5e-5) and check["match"] is True
    assert p["ours_agree_at_first_step"] == 0.0


# --- one quick run on 2 loopback ranks ----------------------------------------------------------------------
def test_quick_run_on_two_loopback_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "train.json"
    # DeepSpeed rides along where it is installed (its twin's first loss is then checked too)
    cfg = quick_train_config(launcher="local", nodes=1, procs_per_node=2, ep=2, out=str(out),
                             include_deepspeed=HAS_DEEPSPEED, timeout_s=180)
    payload = run_train_bench(cfg)
    printed = capsys.readouterr().out
    assert "| implementation | layout | median step s | tokens/s |" in printed
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(payload))  # what was returned is what was written
    assert data["benchmark"] == "train" and data["cluster"]["shaped"] is False
    rows = {r["name"]: r for r in data["implementations"]}
    assert {"sequential", "fsmoe r=2"} <= set(rows)
    for r in rows.values():
        assert len(r["samples_s"]) == cfg.steps and all(s > 0 for s in r["samples_s"])
        assert r["median_s"] == pytest.approx(statistics.median(r["samples_s"]))
        assert r["tokens_per_s"] == pytest.approx(data["tokens_per_step"] / r["median_s"])
        assert len(r["losses"]) == cfg.warmup_steps + cfg.steps and all(math.isfinite(x) for x in r["losses"])
        assert r["loss_last"] < r["loss_first"]  # four AdamW steps at lr 3e-3 from ~ln 256 learn something
    # our schedules train the same function: same loss at every step (float summation order aside)
    assert rows["fsmoe r=2"]["losses"] == pytest.approx(rows["sequential"]["losses"], abs=1e-4)

    # oracle: the first step's loss (before any update) equals a single-process model with the same seed
    # on the same global batch, each rank's rows routed as their own group
    model_cfg = cfg.model_config()
    corpus = load_corpus(cfg.train_config(cfg.impls()[0]).data, model_cfg.seq_len)
    x_BL, y_BL = BatchSampler(corpus.train_N, batch_size=cfg.batch_size, seq_len=model_cfg.seq_len,
                              seed=cfg.seed).sample()
    torch.manual_seed(cfg.seed)
    ref = reference_grid(GPTMoE(model_cfg), 2, 1)
    with torch.no_grad():
        ref_loss = ref(x_BL, y_BL).loss.item()
    assert rows["sequential"]["loss_first"] == pytest.approx(ref_loss, abs=1e-5)

    if HAS_DEEPSPEED:
        assert DEEPSPEED in rows, data["skipped"]
        assert data["initial_loss_check"]["match"] is True
        assert rows[DEEPSPEED]["loss_first"] == pytest.approx(ref_loss, abs=1e-4)
    else:
        assert DEEPSPEED not in rows and data["initial_loss_check"] is None
    assert Path(cfg.chart_path()).exists() == HAS_MATPLOTLIB


def test_deepspeed_missing_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsmoe.bench.deepspeed_train import build_deepspeed_twin

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.moe.layer", None)
    cfg = TrainBenchConfig()
    why = build_deepspeed_twin(cfg.train_config(cfg.impls()[-1]), SimpleNamespace(), 1)  # type: ignore[arg-type]
    assert isinstance(why, str) and "DeepSpeed is not installed" in why


def test_script_is_the_cli() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import benchmarks.train as script

    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
