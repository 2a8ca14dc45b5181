"""Checkpoints: one topology-free format (global tensors) loaded under other layouts with the same model
outputs and, saved again, the same bits (GPT-MoE and Mixtral); saves that survive a kill mid-write;
keep-last-K; and the named errors of a bad --resume, before anything starts."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsmoe.cli import main
from fsmoe.config import (
    DataConfig,
    JobConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    dump_toml,
)
from fsmoe.parallel.dims import ParallelDims, build_groups
from fsmoe.train import checkpoint as ck
from fsmoe.train import run_train
from fsmoe.train.checkpoint import (
    ShardMap,
    check_resume,
    load_checkpoint,
    read_checkpoint,
    read_tensors,
    save_checkpoint,
)
from fsmoe.train.data import load_corpus
from fsmoe.train.distributed import DistContext
from fsmoe.train.rundir import prepare_run_dir
from fsmoe.train.trainer import RankBatches, build_grad_sync, build_model, build_optimizer, train_step
from tests.dist_utils import run_distributed

# No capacity limit: no token is dropped, so routing (and the logits) do not depend on how the tokens are
# split into routing groups, and every layout must give the single-process logits.
MODEL = ModelConfig(seq_len=16, d_model=16, n_layers=2, n_heads=4, d_ff=32,
                    moe=MoEConfig(num_experts=4, top_k=2, d_hidden=32, capacity_factor=None))
LAYOUTS = {
    "ep2xesp2": ParallelConfig(nproc=4, procs_per_node=4, ep=2, esp=2),
    "ep4": ParallelConfig(nproc=4, procs_per_node=4, ep=4),
    "mp2xep2": ParallelConfig(nproc=4, procs_per_node=4, mp=2, ep=2),
}
MIXTRAL = dataclasses.replace(MODEL, arch="mixtral", n_kv_heads=2, moe=dataclasses.replace(MODEL.moe, expert="swiglu"))
SAVES = {"ep2xesp2": (MODEL, "ep2xesp2"), "mp2xep2": (MODEL, "mp2xep2"), "mixtral-mp2xep2": (MIXTRAL, "mp2xep2")}


def _job(out: Path, parallel: ParallelConfig | None = None, model: ModelConfig = MODEL, **train: object) -> JobConfig:
    fields: dict[str, object] = dict(steps=4, batch_size=4, lr=1e-2, lr_warmup=0, log_every=1, eval_iters=1)
    fields.update(train)
    return JobConfig(model=model, data=DataConfig(max_bytes=50_000), train=TrainConfig(**fields),  # type: ignore[arg-type]
                     parallel=parallel or ParallelConfig(), run=RunConfig(out=str(out), progress="lines", threads=1))


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (4, MODEL.seq_len), generator=torch.Generator().manual_seed(3))


def _logits(model: torch.nn.Module, x_BL: torch.Tensor, ctx: DistContext | None) -> tuple[slice, slice, torch.Tensor]:
    """This rank's logits on its rows and sequence shard of ``x_BL`` (eval mode), and where they sit."""
    rows, cols = slice(None), slice(None)
    if ctx is not None:
        dims = ctx.groups.dims
        at = dims.rank_layout(ctx.rank)
        b, seq = x_BL.shape[0] // dims.dense_dp, x_BL.shape[1] // dims.mp
        rows, cols = slice(at.dp * b, (at.dp + 1) * b), slice(at.mp * seq, (at.mp + 1) * seq)
    model.eval()
    with torch.no_grad():
        return rows, cols, model(x_BL[rows]).logits


def _build(job: JobConfig, ctx: DistContext | None):  # noqa: ANN202
    model = build_model(job, ctx)
    opt = build_optimizer(model, job.train)
    batches = RankBatches(load_corpus(job.data, job.model.seq_len).train_N, job, job.run.seed, ctx)
    return model, opt, batches, ShardMap.probe(job, model, ctx)


def save_and_reload_across_layouts(rank: int, world: int, root: str) -> dict[str, tuple[slice, slice, torch.Tensor]]:
    """For each model and layout of SAVES: train 2 steps, save, and record the logits; then load that
    checkpoint under every other layout, record the logits and save it again (same step)."""
    x_BL = _batch()
    logits = {}
    for saved, (model_cfg, layout) in SAVES.items():
        job = _job(Path(root) / saved, LAYOUTS[layout], model_cfg)
        ctx = DistContext(rank, world, build_groups(ParallelDims.from_config(job.parallel), channels=2))
        model, opt, batches, shards = _build(job, ctx)
        sync = build_grad_sync(model, job, ctx)
        for step in (1, 2):
            train_step(model, opt, sync, batches.sample(), step, job.train, ctx)
        save_checkpoint(job.run.out, 2, model, opt, shards, samplers={"train": batches.sampler}, job_toml="",
                        plan_json=None, keep=1)
        logits[saved] = _logits(model, x_BL, ctx)
        ckpt = read_checkpoint(job.run.out)
        for loaded in LAYOUTS:
            if loaded == layout:
                continue
            job_l = _job(Path(root) / f"{saved}-as-{loaded}", LAYOUTS[loaded], model_cfg)
            ctx_l = DistContext(rank, world, build_groups(ParallelDims.from_config(job_l.parallel), channels=2))
            model_l, opt_l, batches_l, shards_l = _build(job_l, ctx_l)
            load_checkpoint(ckpt, model_l, opt_l, shards_l, samplers={"train": batches_l.sampler})
            logits[f"{saved}-as-{loaded}"] = _logits(model_l, x_BL, ctx_l)
            save_checkpoint(job_l.run.out, 2, model_l, opt_l, shards_l, samplers={"train": batches_l.sampler},
                            job_toml="", plan_json=None, keep=1)
    return logits


def _assemble(per_rank: list[dict], key: str) -> torch.Tensor:
    full = torch.full((4, MODEL.seq_len, MODEL.vocab_size), float("nan"))
    for logits in per_rank:
        rows, cols, part = logits[key]
        full[rows, cols] = part
    return full


def _saved_state(path: Path) -> dict[str, torch.Tensor]:
    """The layout-free part of a checkpoint: the model, AdamW and the sampler (not the per-rank RNG)."""
    return {k: v for k, v in read_tensors(read_checkpoint(path)).items() if not k.startswith("rng.")}


def test_a_checkpoint_loads_under_any_layout(tmp_path: Path) -> None:
    per_rank = run_distributed(save_and_reload_across_layouts, 4, str(tmp_path), timeout=180)
    with torch.random.fork_rng():
        for saved, (model_cfg, layout) in SAVES.items():
            # one process: the same logits, and saved again, the same bits
            job = _job(tmp_path / f"{saved}-as-1", model=model_cfg)
            model, opt, batches, shards = _build(job, None)
            load_checkpoint(read_checkpoint(tmp_path / saved), model, opt, shards, samplers={"train": batches.sampler})
            _, _, single = _logits(model, _batch(), None)
            save_checkpoint(job.run.out, 2, model, opt, shards, samplers={"train": batches.sampler}, job_toml="",
                            plan_json=None, keep=1)

            original = _saved_state(tmp_path / saved)
            assert {k.split(".")[0] for k in original} == {"model", "optim", "data"}
            assert original["model.blocks.1.mlp.experts.w1_eDH"].shape == (4, 16, 32)  # global: all E, all H
            assert original["model.blocks.0.attn.qkv.weight"].shape[0] >= 32  # every head (GQA: fewer k, v)
            assert original["optim.exp_avg_sq.blocks.1.mlp.experts.w1_eDH"].abs().sum() > 0
            assert original["optim.step"].tolist() == [2.0] * len(original["optim.step"])
            torch.testing.assert_close(_assemble(per_rank, saved), single, rtol=0, atol=1e-5)
            for loaded in [*(k for k in LAYOUTS if k != layout), "1"]:
                name = f"{saved}-as-{loaded}"
                if loaded != "1":
                    torch.testing.assert_close(_assemble(per_rank, name), single, rtol=0, atol=1e-5)
                again = _saved_state(tmp_path / name)
                assert again.keys() == original.keys()
                different = [k for k in original if not torch.equal(original[k], again[k])]
                assert not different, f"{name}: {different}"


# --- saving safely -------------------------------------------------------------------------------------------

_KILLED_SAVE = """
import os, signal, sys
from fsmoe.config import load_toml
from fsmoe.train import checkpoint, run_train

hash_file = checkpoint._sha256
def dying(path):  # SIGKILL this process while the save of step 2 is writing its files
    if ".tmp-step_000002" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return hash_file(path)
checkpoint._sha256 = dying
run_train(load_toml(sys.argv[1]))
"""


def test_a_save_killed_mid_write_leaves_the_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    root = out / "checkpoints"
    (tmp_path / "job.toml").write_text(dump_toml(_job(out, steps=3, save_every=1)))
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "job.toml")],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert (root / "latest").read_text() == "step_000001\n"
    assert (root / ".tmp-step_000002" / ".metadata").exists()  # the save was writing when it died
    assert read_checkpoint(out).step == 1
    with pytest.raises(ValueError, match="is a partial checkpoint"):
        read_checkpoint(root / ".tmp-step_000002")

    # Resuming into the same run: the leftovers go at the next save, and only the newest --keep stay.
    result = run_train(_job(out, steps=5, save_every=1, keep_checkpoints=2, resume=str(out)))
    assert result.steps == 5
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]
    assert read_checkpoint(out).step == 5
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 5]  # step 1 of the killed run, 2-5 and the final evaluation of this one


def test_a_crash_before_latest_is_updated_keeps_the_previous_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    run_train(_job(out, steps=1, save_every=1))

    point_latest = ck._point_latest

    def crash(root: Path, name: str) -> None:  # resuming points latest at step 1 again; the save then fails
        if name != "step_000001":
            raise OSError(28, "No space left on device")
        point_latest(root, name)

    monkeypatch.setattr(ck, "_point_latest", crash)
    with pytest.raises(OSError, match="No space left"):
        run_train(_job(out, steps=2, save_every=1, resume=str(out)))
    assert (out / "checkpoints" / "step_000002" / "meta.json").exists()  # written and renamed, not yet pointed to
    assert read_checkpoint(out).step == 1


# --- a bad --resume ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "run"
    run_train(_job(out, steps=2, save_every=2))
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to / "checkpoints" / "step_000002"


def test_bad_resume_inputs_are_named(saved_run: Path, tmp_path: Path) -> None:
    def refused(resume: Path | str, message: str, **changes: object) -> None:
        with pytest.raises(ValueError, match=message):
            check_resume(_job(tmp_path / "new", resume=str(resume), **changes))

    refused(tmp_path / "missing", "no such directory")
    refused(tmp_path, "neither a checkpoint directory .* nor a run directory")
    refused(saved_run, r"the checkpoint is at step 2, and --steps 2 leaves nothing to do", steps=2)
    other = dataclasses.replace(MODEL, d_model=32, moe=dataclasses.replace(MODEL.moe, num_experts=8))
    refused(saved_run, r"model.d_model \(16, 32\); model.moe.num_experts \(4, 8\)", model=other)

    incomplete = _copy(saved_run, tmp_path / "incomplete")
    (incomplete / "meta.json").unlink()
    refused(incomplete, "is incomplete: it has no meta.json")
    refused(incomplete.parent.parent, "step_000002' is incomplete: it has no meta.json")  # what latest names

    flipped = _copy(saved_run, tmp_path / "flipped")
    data = next(flipped.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    refused(flipped, f"corrupt: the SHA-256 of {data.name} differs")
    # the ranks of fsmoe's launcher skip the hashes the launching process checked: sizes and configs only
    assert check_resume(_job(tmp_path / "new", resume=str(flipped)), verify=False).step == 2
    data.write_bytes(bytes(raw[:-10]))
    refused(flipped, f"corrupt: {data.name} has {len(raw) - 10} bytes")

    assert check_resume(_job(tmp_path / "new", resume=str(saved_run))).step == 2  # the run directory: its latest


def test_resume_is_checked_before_any_rank_starts(saved_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--nproc", "2", "--ep", "2", "--steps", "5", "--resume", str(tmp_path / "nope"),
              "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()

    # resuming into the run that holds the checkpoint needs no --overwrite; another old run does
    prepare_run_dir(_job(saved_run, steps=4, resume=str(saved_run)))
    assert (saved_run / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="holds a previous run"):
        prepare_run_dir(_job(saved_run, steps=4, resume=str(_copy(saved_run, tmp_path / "elsewhere"))))
