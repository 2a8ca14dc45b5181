"""Job files: the resolved job as TOML (:func:`dump_toml`), read back and checked (:func:`load_toml`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fsmoe.config.job import SECTIONS, JobConfig, coerce, flag_specs, get_value


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump_toml(job: JobConfig) -> str:
    """The whole resolved job as TOML (None is written as ``"none"``); :func:`load_toml` reads it back."""
    lines = ["# fsmoe job: the resolved configuration of a run (load it with --config FILE)"]
    current = None
    for spec in flag_specs():
        section = spec.key.partition(".")[0]
        if section != current:
            lines += ["", f"[{section}]"]
            current = section
        lines.append(f"{spec.key.partition('.')[2]} = {_toml_value(get_value(job, spec.key))}")
    return "\n".join(lines) + "\n"


def read_toml_overrides(path: str | Path) -> dict[str, Any]:
    """The ``section.field -> value`` pairs of a TOML job file, coerced; ``ValueError`` naming the file and
    the key for a missing file, bad TOML, an unknown section or key, or a value of the wrong type."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    specs = {s.key: s for s in flag_specs()}
    out: dict[str, Any] = {}
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise ValueError(f"config file {str(path)!r}: unknown section [{section}]; the sections are "
                             f"{', '.join(SECTIONS)}")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key not in specs:
                raise ValueError(f"config file {str(path)!r}: unknown key {name!r} in [{section}]; it has "
                                 f"{', '.join(k.partition('.')[2] for k in specs if k.startswith(section + '.'))}")
            try:
                out[key] = coerce(specs[key], value)
            except ValueError as e:
                raise ValueError(f"config file {str(path)!r}: {e}") from None
    return out


def load_toml(path: str | Path, base: JobConfig | None = None) -> JobConfig:
    """``base`` (default: :class:`JobConfig`'s defaults) with the file's values applied."""
    overrides = read_toml_overrides(path)
    try:
        return (base or JobConfig()).with_overrides(overrides)
    except ValueError as e:
        raise ValueError(f"config file {str(path)!r}: {e}") from None
