"""The job configuration: one typed, frozen tree that every command reads, and the rules it must obey.

Legend: T tokens, D model dim (the paper's M), H expert hidden, E experts, K top-k, C capacity.

:class:`JobConfig` composes one ``@dataclass(kw_only=True, frozen=True)`` per concern —
``model`` (with its ``moe`` layers), ``parallel``, ``schedule``, ``plan``, ``train``, ``data``, ``run``,
``cluster``, ``bench``, ``sim`` — and each section validates its own fields in ``__post_init__``; rules
that tie sections together (E divisible by EP, H by ESP, heads and sequence by MP) are checked once, in
:meth:`JobConfig.__post_init__`, and those of a training job (the batch splits over the dense
data-parallel ranks) in :meth:`JobConfig.check_training`. Every message names the values.

The flag vocabulary comes from here too: each field carries its flag name, help text and parser in
its metadata (:func:`flag_specs`), so ``fsmoe train``, ``fsmoe bench layer`` and ``fsmoe bench train``
declare the same flag with the same meaning and default. A command starts from a *recipe* (a
function returning a :class:`JobConfig`; :data:`RECIPES`), then a ``--config job.toml`` file, then the
flags given (:meth:`JobConfig.with_overrides`). :func:`dump_toml` writes the resolved job next to a
run's results and :func:`load_toml` reads it back into the same job.

This package is the bottom of fsmoe: it imports nothing from the rest of fsmoe, reads no environment
and starts nothing. ``values`` holds the primitive vocabulary (choices, parsers, schedule capabilities,
link rates), ``model`` the model section and its presets, ``job`` the other sections and the job,
``files`` the TOML files.
"""

from fsmoe.config.files import dump_toml, load_toml, read_toml_overrides
from fsmoe.config.job import (
    DEFAULT_BENCH_SCHEDULES,
    PLANNED_SCHEDULES,
    RECIPES,
    SECTIONS,
    BenchConfig,
    ClusterConfig,
    DataConfig,
    FlagSpec,
    JobConfig,
    ParallelConfig,
    PlanConfig,
    RunConfig,
    ScheduleConfig,
    SimConfig,
    TrainConfig,
    all_keys,
    check_layout,
    coerce,
    flag_specs,
    get_value,
    layer_bench_recipe,
    train_bench_recipe,
    train_recipe,
)
from fsmoe.config.model import (
    GATE_IGNORES,
    MAX_CPU_PARAMS,
    MODEL_PRESETS,
    ModelConfig,
    MoEConfig,
    gpt2_moe_small,
    gpt2_moe_tiny,
    gpt2_xl_moe,
    mixtral_8x7b,
    mixtral_8x22b,
    mixtral_tiny,
    model_preset,
)
from fsmoe.config.values import (
    DISPATCHER_NAMES,
    DROP_POLICIES,
    EXPERT_NAMES,
    GATE_NAMES,
    LAUNCHERS,
    MODEL_NAMES,
    NOISY_GATES,
    ORDER_NAMES,
    SCHEDULES,
    UNSHAPED_WORDS,
    ScheduleSpec,
    check_degrees,
    format_rate,
    get_schedule,
    parse_bool,
    parse_degree_pair,
    parse_rate,
    round_up,
)

__all__ = [
    "DEFAULT_BENCH_SCHEDULES",
    "GATE_IGNORES",
    "DISPATCHER_NAMES",
    "DROP_POLICIES",
    "EXPERT_NAMES",
    "GATE_NAMES",
    "LAUNCHERS",
    "MODEL_NAMES",
    "MAX_CPU_PARAMS",
    "MODEL_PRESETS",
    "NOISY_GATES",
    "ORDER_NAMES",
    "RECIPES",
    "SCHEDULES",
    "SECTIONS",
    "UNSHAPED_WORDS",
    "BenchConfig",
    "ClusterConfig",
    "DataConfig",
    "FlagSpec",
    "JobConfig",
    "ModelConfig",
    "MoEConfig",
    "PLANNED_SCHEDULES",
    "ParallelConfig",
    "PlanConfig",
    "RunConfig",
    "SimConfig",
    "ScheduleConfig",
    "ScheduleSpec",
    "TrainConfig",
    "all_keys",
    "check_degrees",
    "check_layout",
    "coerce",
    "dump_toml",
    "flag_specs",
    "format_rate",
    "get_schedule",
    "get_value",
    "gpt2_moe_small",
    "gpt2_moe_tiny",
    "layer_bench_recipe",
    "load_toml",
    "mixtral_8x7b",
    "mixtral_8x22b",
    "mixtral_tiny",
    "gpt2_xl_moe",
    "model_preset",
    "parse_bool",
    "parse_degree_pair",
    "parse_rate",
    "read_toml_overrides",
    "round_up",
    "train_bench_recipe",
    "train_recipe",
]
