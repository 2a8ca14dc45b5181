"""The job config: one flag vocabulary over every command, recipes, TOML files that round-trip, and
clear errors for malformed files and values."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from pathlib import Path

import pytest

from fsmoe.cli import COMMANDS, build_parser, job_from_args, main
from fsmoe.config import (
    MAX_CPU_PARAMS,
    RECIPES,
    SECTIONS,
    JobConfig,
    MoEConfig,
    dump_toml,
    flag_specs,
    get_value,
    load_toml,
    model_preset,
)

SPECS = {s.key: s for s in flag_specs()}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolving a train job checks its --out (default runs/default, relative): keep that off the checkout."""
    monkeypatch.chdir(tmp_path)


POSITIONAL = {("report",): ["runs/x"]}  # what a command needs besides its flags


def _parse(cmd_words: tuple[str, ...], *argv: str):  # noqa: ANN202
    return build_parser().parse_args([*cmd_words, *POSITIONAL.get(cmd_words, []), *argv])


def _flags(cmd_words: tuple[str, ...]) -> dict[str, str]:
    """flag -> config key, as the command's parser declares them."""
    parser = build_parser()
    sub = parser
    for w in cmd_words:
        action = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction")
        sub = action.choices[w]
    return {opt: a.dest for a in sub._actions for opt in a.option_strings if "." in a.dest}


def _sample(key: str) -> list[str]:
    """A value for the flag of ``key`` that differs from the declared default."""
    spec = SPECS[key]
    default = get_value(JobConfig(), key)
    if spec.is_bool:
        return ["--no-" + spec.flag[2:]] if default else [spec.flag]
    if spec.choices:
        value = [c for c in spec.choices if c != default][-1] if spec.nargs is None else spec.choices[-1]
    elif spec.nargs is not None:
        value = "3/5" if spec.parse is not None and spec.parse.__name__ == "parse_degree_pair" else "3"
    elif isinstance(default, float):
        value = "0.5"
    elif isinstance(default, int) and not isinstance(default, bool):
        value = str(default + 3)
    else:
        value = "none" if default is not None else "7"
    return [spec.flag, value]


def test_every_field_has_one_distinct_flag() -> None:
    flags = [s.flag for s in SPECS.values()]
    assert len(flags) == len(set(flags)), sorted(f for f in flags if flags.count(f) > 1)
    assert {k.partition(".")[0] for k in SPECS} == set(SECTIONS)


def test_shared_flags_mean_the_same_in_every_command() -> None:
    """Every flag two commands share reaches the same config key with the same parsed value, and each
    command declares exactly the fields of its sections."""
    declared = {cmd.words: _flags(cmd.words) for cmd in COMMANDS}
    for cmd in COMMANDS:
        assert set(declared[cmd.words].values()) == {s.key for s in flag_specs(cmd.sections)}
    for a, b in itertools.combinations([c for c in COMMANDS if c.sections], 2):
        shared = declared[a.words].keys() & declared[b.words].keys()
        assert shared, (a.words, b.words)
        for flag in shared:
            key = declared[a.words][flag]
            assert declared[b.words][flag] == key
            argv = _sample(key)
            got_a, got_b = vars(_parse(a.words, *argv)), vars(_parse(b.words, *argv))
            assert got_a[key] == got_b[key], (flag, got_a[key], got_b[key])


def test_defaults_are_the_recipes_and_the_recipes_differ_only_where_documented() -> None:
    """Without flags a command runs its recipe; ``fsmoe train``'s recipe is the declared defaults, the
    benchmarks change only the layout, launcher, output, threads and their own workload sizes, and the
    simulator's commands only the model preset (a paper model) and the output."""
    base = JobConfig()
    for cmd in COMMANDS:
        job = job_from_args(_parse(cmd.words), cmd)
        assert job == RECIPES[cmd.recipe]()
    assert RECIPES["train"]() == base
    allowed = {"parallel.nproc", "parallel.procs_per_node", "parallel.ep", "cluster.launcher", "run.out",
               "run.threads", "bench.reps", "bench.warmup", "bench.schedules", "bench.timeout_s",
               "schedule.name", "schedule.r_fwd", "schedule.r_bwd", "model.d_model", "moe.d_hidden",
               "moe.capacity_factor", "data.max_bytes"}
    for name, recipe in RECIPES.items():
        job = recipe()
        changed = {k for k in SPECS if get_value(job, k) != get_value(base, k)}
        if name == "simulate":
            assert job.model == model_preset(job.model.name) and job.model.name != base.model.name
            changed = {k for k in changed if k.partition(".")[0] not in ("model", "moe")}
        assert changed <= allowed, (name, changed - allowed)


def test_help_shows_each_commands_own_default(capsys: pytest.CaptureFixture[str]) -> None:
    cases = ((("train",), "model dim D (default: 128)"), (("bench", "layer"), "model dim D (default: 512)"))
    for words, shown in cases:
        with pytest.raises(SystemExit):
            main([*words, "--help"])
        assert shown in " ".join(capsys.readouterr().out.split())


def _odd_job() -> JobConfig:
    """A job with a value off the default in many fields, None where None is allowed, tuples and bools."""
    return JobConfig().with_overrides({
        "model.name": "tiny", "model.d_model": 64, "moe.capacity_factor": None, "moe.gate": "switch",
        "moe.noisy": True, "parallel.nproc": 4, "parallel.procs_per_node": 2, "parallel.ep": 2,
        "parallel.esp": 2, "parallel.dispatcher": "2dh", "schedule.name": "fsmoe", "schedule.r_fwd": 2,
        "schedule.r_bwd": 4, "schedule.gar_plan": "moe:3=2MB", "train.grad_clip": None, "train.max_seconds": 9.5,
        "data.path": 'a "quoted" \\ path.txt', "run.out": "runs/x", "run.threads": 2, "cluster.launcher": "auto",
        "cluster.burst_bytes": 65536, "bench.degrees": (1, 4), "bench.mixed_degrees": ((2, 8),),
        "bench.deepspeed": False, "bench.schedules": ("sequential", "fsmoe"),
        "schedule.layer_degrees": ((2, 4), (1, 8)), "plan.reprofile": True, "plan.max_degree": 4,
    })


@pytest.mark.parametrize("make", [*RECIPES.values(), _odd_job], ids=[*RECIPES, "odd"])
def test_toml_round_trip(tmp_path: Path, make, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)  # relative paths of the job (data, run directory) land here
    job = make()
    if job.data.path is not None:
        Path(job.data.path).write_text("x = 1\n" * 100)  # the train command checks the data file
    path = tmp_path / "job.toml"
    path.write_text(dump_toml(job))
    assert load_toml(path) == job
    for cmd in COMMANDS:  # --config FILE resolves to the same job in every command that reads all of it
        if set(cmd.sections) >= {"model", "moe", "parallel", "schedule", "train", "data", "run", "cluster"}:
            if job.model.estimated_params() > MAX_CPU_PARAMS:  # a paper-sized model: simulated, never trained here
                with pytest.raises(ValueError, match="B parameters, more than"):
                    job_from_args(_parse(cmd.words, "--config", str(path)), cmd)
                continue
            assert job_from_args(_parse(cmd.words, "--config", str(path)), cmd) == job


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[moe]\nnum_experts = 8\ntop_k = 1\n[train]\nsteps = 7\n")
    cmd = COMMANDS[0]
    job = job_from_args(_parse(cmd.words, "--config", str(path), "--steps", "9"), cmd)
    assert (job.moe.num_experts, job.moe.top_k, job.train.steps) == (8, 1, 9)
    assert job.moe.d_hidden == MoEConfig().d_hidden  # keys the file leaves out keep the recipe's


def test_model_preset_then_overrides() -> None:
    job = JobConfig().with_overrides({"model.name": "small", "moe.num_experts": 16})
    assert (job.model.d_model, job.moe.num_experts, job.moe.d_hidden) == (768, 16, 3072)
    assert JobConfig().with_overrides({"moe.gate": "switch"}).moe.top_k == 1  # switch is top-1
    with pytest.raises(ValueError, match="the switch gate is top-1, got top_k=2"):
        JobConfig().with_overrides({"moe.gate": "switch", "moe.top_k": 2})
    tuned = JobConfig().with_overrides({"moe.capacity_factor": 2.0, "moe.renormalize": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switching gates resets what the new gate ignores: no warning
        soft = tuned.with_overrides({"moe.gate": "softmoe"}).moe
    assert (soft.capacity_factor, soft.renormalize) == (MoEConfig().capacity_factor, False)
    with pytest.warns(UserWarning, match="the softmoe gate ignores capacity_factor=3.0"):
        tuned.with_overrides({"moe.gate": "softmoe", "moe.capacity_factor": 3.0})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[moe]\nexperts = 4\n", r"unknown key 'experts' in \[moe\]; it has num_experts, top_k"),
        ("[optimizer]\nlr = 1\n", r"unknown section \[optimizer\]"),
        ("[train]\nsteps = 'ten'\n", "train.steps: invalid literal for int"),
        ("[train]\nsteps = 2.5\n", "train.steps: expected int, got 2.5"),
        ("[bench]\ndeepspeed = 1\n", "bench.deepspeed: expected bool, got 1"),
        ("[moe]\ngate = 'ring'\n", "unknown gate 'ring'; choose one of gshard"),
        ("[train\n", "is not valid TOML"),
        ("[parallel]\nnproc = 4\nep = 3\n", r"ep\*esp must divide world_size, got ep=3"),
        ("[plan]\nmin_gain = 1.5\n", r"min_gain must be in \[0, 1\), got 1.5"),
        ("[plan]\ntune = 0\n", "tune must be an int >= 1, got 0"),
    ],
)
def test_malformed_config_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as exc:
        load_toml(path)
    assert str(path) in str(exc.value)


def test_cli_reports_a_bad_config_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--config", str(tmp_path / "missing.toml")], ["--capacity-factor", "zero"]):
        with pytest.raises(SystemExit) as exc:
            main(["train", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "error" in err and "Traceback" not in err


def test_wrong_python_values_are_named() -> None:
    with pytest.raises(ValueError, match="moe.top_k: invalid literal"):
        JobConfig().with_overrides({"moe.top_k": "two"})
    with pytest.raises(ValueError, match="unknown config key 'moe.experts'"):
        JobConfig().with_overrides({"moe.experts": 2})
    with pytest.raises(ValueError, match="parallel.ep: expected int, got 2.0"):
        JobConfig().with_overrides({"parallel.ep": 2.0})
    assert dataclasses.is_dataclass(JobConfig())
