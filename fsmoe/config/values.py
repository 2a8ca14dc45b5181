"""The config's primitive vocabulary: the names of every choice, the parsers and field helper behind every
flag, the schedules' capabilities (data shared by the config, the runtime and the simulator) and link
rates. Imports nothing from fsmoe."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

GATE_NAMES = ("gshard", "switch", "sigmoid", "xmoe", "expert_choice", "softmoe")
ORDER_NAMES = ("einsum", "index")
EXPERT_NAMES = ("ffn", "swiglu")
DROP_POLICIES = ("position", "probability")
NOISY_GATES = ("gshard", "switch", "sigmoid")
DISPATCHER_NAMES = ("a2a", "2dh", "1dh")
MODEL_NAMES = ("tiny", "small", "mixtral-tiny", "gpt2-xl-moe", "mixtral-8x7b", "mixtral-8x22b")  # MODEL_PRESETS' keys
ARCH_NAMES = ("gpt", "mixtral")
DEVICE_NAMES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("fp32", "bf16")
PROGRESS_NAMES = ("auto", "bar", "lines")
LAUNCHERS = ("local", "emulated", "auto")


# --- flag metadata ------------------------------------------------------------------------------------------
def choice_parser(what: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        check_choice(what, text, choices)
        return text

    parse.choices = choices  # type: ignore[attr-defined]
    return parse


def optional_parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``none`` (any case) means None; anything else goes through ``parse``."""

    def read(text: str) -> Any:
        return None if text.strip().lower() == "none" else parse(text)

    read.optional = True  # type: ignore[attr-defined]
    read.__name__ = getattr(parse, "__name__", "value")
    return read


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false, yes/no, on/off, 1/0), got {text!r}")


def parse_degree_pair(text: str) -> tuple[int, int]:
    """``4/8`` -> (4, 8): a forward and a backward pipeline degree."""
    fwd, sep, bwd = text.partition("/")
    try:
        pair = (int(fwd), int(bwd))
    except ValueError:
        pair = None
    if not sep or pair is None:
        raise ValueError(f"expected R_FWD/R_BWD such as 4/8, got {text!r}")
    return pair


def opt(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
        parse: Callable[[str], Any] | None = None, nargs: str | None = None,
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its command-line flag (``--<name>`` unless ``flag`` is given), help and parser."""
    meta = {"help": help, "flag": flag, "parse": parse, "nargs": nargs}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def check_at_least(obj: object, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{type(obj).__name__}: {name} must be an int >= {minimum}, got {value!r}")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


# --- schedules (what each allows: data that the config, the runtime and the simulator share) ------------------
@dataclass(kw_only=True, frozen=True)
class ScheduleSpec:
    """What a schedule does (paper §3.3–3.4, §7); the task lists are built by :mod:`fsmoe.schedule.schedules`."""

    name: str
    separate_channels: bool  # intra and inter collectives on separate channels
    pipelined: bool  # r > 1 allowed
    independent_degrees: bool  # r_fwd != r_bwd allowed
    gar_in_moe: bool  # the layer's GAR slice runs inside the MoE backward
    gar_overlap_dense: bool  # the remaining GAR overlaps the dense backward
    gar_chunk_bytes: int | None = None  # fixed-size GAR chunks (Lina); None: planned ranges
    gar_blocking: bool = True  # a GAR slice inside the MoE block occupies the inter channel until done


def _spec(name: str, *, channels: int = 1, pipelined: bool = True, independent: bool = False,
          gar_in_moe: bool = False, gar_overlap_dense: bool = False, **kw: Any) -> ScheduleSpec:
    return ScheduleSpec(name=name, separate_channels=channels == 2, pipelined=pipelined,
                        independent_degrees=independent, gar_in_moe=gar_in_moe, gar_overlap_dense=gar_overlap_dense,
                        **kw)


SCHEDULES: dict[str, ScheduleSpec] = {
    "sequential": _spec("sequential", pipelined=False),
    "tutel": _spec("tutel"),
    "tutel_improved": _spec("tutel_improved", gar_overlap_dense=True),
    "lina": _spec("lina", gar_in_moe=True, gar_overlap_dense=True, gar_chunk_bytes=30 * 2**20, gar_blocking=False),
    "fsmoe_no_iio": _spec("fsmoe_no_iio", independent=True, gar_in_moe=True, gar_overlap_dense=True),
    "fsmoe": _spec("fsmoe", channels=2, independent=True, gar_in_moe=True, gar_overlap_dense=True),
}


def get_schedule(name: str) -> ScheduleSpec:
    check_choice("schedule", name, tuple(SCHEDULES))
    return SCHEDULES[name]


def check_degrees(spec: ScheduleSpec, r_fwd: int, r_bwd: int) -> None:
    for what, r in (("r_fwd", r_fwd), ("r_bwd", r_bwd)):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{what} must be an int >= 1, got {r!r}")
    if not spec.pipelined and (r_fwd, r_bwd) != (1, 1):
        raise ValueError(f"schedule {spec.name!r} does not pipeline; got r_fwd={r_fwd}, r_bwd={r_bwd} (need 1, 1)")
    if not spec.independent_degrees and r_fwd != r_bwd:
        raise ValueError(f"schedule {spec.name!r} uses one degree for both passes; got r_fwd={r_fwd} != r_bwd={r_bwd}")



# --- link rates (tc's units): what ``--link`` accepts; fsmoe.cluster.spec shapes the links with them ---

UNSHAPED_WORDS = ("unshaped", "none", "off")
# tc's decimal bit units; tc's "bps" units are *bytes* per second, a classic mix-up, so they are refused.
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_rate(text: str) -> int | None:
    """``"1gbit"`` -> 1_000_000_000 (bits/s); ``"unshaped"`` / ``"none"`` / ``"off"`` -> None.

    Units are tc's decimal bit units: ``bit``, ``kbit``, ``mbit``, ``gbit``, ``tbit``; a bare number
    is bits/s. Raises ``ValueError`` naming the accepted forms."""
    if text.strip().lower() in UNSHAPED_WORDS:
        return None
    m = _RATE_RE.match(text.lower())
    if m is None or m.group(2) not in ("", *_RATE_UNITS):
        hint = " (tc's 'bps' units are bytes/s; write e.g. '800mbit')" if text.lower().endswith("bps") else ""
        raise ValueError(
            f"cannot read link rate {text!r}{hint}: expected a number with one of the units "
            f"{', '.join(_RATE_UNITS)} (e.g. '1gbit', '200mbit'), or one of {', '.join(UNSHAPED_WORDS)}"
        )
    bits = float(m.group(1)) * _RATE_UNITS[m.group(2) or "bit"]
    if bits < 8_000:
        raise ValueError(f"link rate {text!r} is below 8kbit/s; nothing useful runs over that")
    return int(bits)


def format_rate(bits_per_s: int | None) -> str:
    """The inverse of :func:`parse_rate` for display: 1_000_000_000 -> ``"1gbit"``."""
    if bits_per_s is None:
        return "unshaped"
    for unit, scale in sorted(_RATE_UNITS.items(), key=lambda kv: -kv[1]):
        if bits_per_s >= scale and bits_per_s % (scale // 1000 or 1) == 0:
            return f"{bits_per_s / scale:g}{unit}"
    return f"{bits_per_s}bit"
