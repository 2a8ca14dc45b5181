"""The package's layering, read from the source with ``ast`` (nothing is imported).

Every ``import`` statement counts: at module level, inside functions and under ``TYPE_CHECKING``. An
import names the module it loads: ``from fsmoe.moe import layer`` names ``fsmoe.moe.layer`` (a
submodule), ``from fsmoe.moe import MoELayer`` names the package ``fsmoe.moe`` (its ``__init__``).
Loading a submodule also runs its parent packages' ``__init__``; that is not counted as an edge, or
every package whose ``__init__`` re-exports its submodules would be a cycle.

Rules:
* ``fsmoe/moe`` is single-device math: it imports from fsmoe only ``fsmoe.moe`` and ``fsmoe.config``,
  and never ``torch.distributed``;
* ``fsmoe.config`` (a module or a package) imports nothing from the rest of fsmoe;
* ``fsmoe/schedule`` builds on moe (never on parallel); ``fsmoe/parallel`` may build on both;
* no import cycle among fsmoe's modules, nor among its units (subpackages and top-level modules).
"""

from __future__ import annotations

import ast
from collections.abc import Container, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fsmoe"

# What each unit may import from fsmoe (besides itself): the layering of docs/architecture.md. A new unit
# must be added here (test_every_unit_has_a_rule).
ALLOWED = {
    "config": set(),
    "nn": set(),
    "moe": {"config"},
    "schedule": {"config", "moe"},
    "parallel": {"config", "moe", "nn", "schedule"},
    "models": {"config", "moe", "nn"},
    "perf": {"cluster", "config", "models", "moe", "nn", "parallel", "schedule"},
    "sim": {"config", "models", "moe", "nn", "parallel", "perf", "schedule"},
    "cluster": {"config", "parallel"},
    "train": {"config", "models", "moe", "nn", "parallel", "perf", "schedule"},
    "bench": {"cluster", "config", "models", "moe", "nn", "parallel", "perf", "schedule", "train"},
    "cli": {"bench", "cluster", "config", "parallel", "perf", "train"},
    "__main__": {"cli"},
    "fsmoe": set(),  # the package's own __init__
}
FORBIDDEN_IN_MOE = ("torch.distributed",)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement anywhere in ``tree`` loads (``from A import b``: ``A.b``,
    which :func:`resolve` maps to the module ``A.b`` or, if b is not a module, to ``A``). Relative
    imports are made absolute against ``name``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def uses_torch_distributed(tree: ast.AST) -> bool:
    """``torch.distributed`` written as an attribute (``torch.distributed.all_reduce``) without importing it."""
    return any(
        isinstance(n, ast.Attribute) and n.attr == "distributed" and isinstance(n.value, ast.Name)
        and n.value.id == "torch"
        for n in ast.walk(tree)
    )


def resolve(name: str, known: Container[str]) -> str | None:
    """The fsmoe module a dotted name loads: the longest known prefix (``fsmoe.moe.layer.MoELayer`` →
    ``fsmoe.moe.layer``); None outside fsmoe."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in known:
            return prefix
    return None


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module → fsmoe modules it imports, module → every dotted name it imports)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    raw: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        names = imported_names(tree, name, path.name == "__init__.py")
        if uses_torch_distributed(tree):
            names.add("torch.distributed")
        raw[name] = names
        graph[name] = {t for t in (resolve(n, mods) for n in names) if t is not None and t != name}
    return graph, raw


def unit_of(module: str) -> str:
    """``fsmoe.moe.layer`` → ``moe``; top-level modules are units of their own (``cli``, ``config``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def unit_graph(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        edges = units.setdefault(unit_of(src), set())
        edges.update(unit_of(d) for d in dsts if unit_of(d) != unit_of(src))
    return units


def components(graph: Mapping[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` with a cycle in them (two or more nodes, or one
    that imports itself): Kosaraju, iteratively."""
    nodes = sorted(set(graph) | {d for ds in graph.values() for d in ds})
    order: list[str] = []
    seen: set[str] = set()
    for start in nodes:
        if start in seen:
            continue
        seen.add(start)
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                order.append(node)
                stack.pop()
            elif nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    reverse: dict[str, set[str]] = {n: set() for n in nodes}
    for src, dsts in graph.items():
        for d in dsts:
            reverse[d].add(src)
    assigned: set[str] = set()
    out = []
    for start in reversed(order):
        if start in assigned:
            continue
        comp, todo = {start}, [start]
        assigned.add(start)
        while todo:
            for prev in reverse[todo.pop()] - assigned:
                assigned.add(prev)
                comp.add(prev)
                todo.append(prev)
        if len(comp) > 1 or start in graph.get(start, ()):
            out.append(comp)
    return out


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One named cycle per strongly connected component of ``graph`` (see :func:`find_cycle`)."""
    cycles = []
    for comp in components(graph):
        cycle = find_cycle({n: graph.get(n, set()) & comp for n in comp})
        assert cycle is not None
        cycles.append(cycle)
    return sorted(cycles)


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path [a, b, ..., a], or None. Iterative DFS, sorted order, so
    the answer is deterministic."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


GRAPH, RAW = import_graph()


def test_the_parser_sees_the_package() -> None:
    assert {"fsmoe.config", "fsmoe.moe", "fsmoe.moe.layer", "fsmoe.schedule.pipelined"} <= set(GRAPH)
    assert "fsmoe.moe.gates" in GRAPH["fsmoe.moe.layer"]
    assert "fsmoe.config" in GRAPH["fsmoe.moe.gates"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if unit_of(m) == "moe"))
def test_moe_is_single_device_math(module: str) -> None:
    bad = sorted(n for n in RAW[module] if any(n == f or n.startswith(f + ".") for f in FORBIDDEN_IN_MOE))
    assert not bad, f"{module} uses {bad}: fsmoe.moe must not communicate (that is fsmoe.parallel's job)"
    outside = sorted(d for d in GRAPH[module] if unit_of(d) not in ("moe", "config"))
    assert not outside, f"{module} imports {outside}; fsmoe.moe may import only fsmoe.moe and fsmoe.config"


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_units_import_only_the_layers_below_them(unit: str) -> None:
    bad = {
        m: sorted(d for d in GRAPH[m] if unit_of(d) not in ALLOWED[unit] | {unit})
        for m in GRAPH
        if unit_of(m) == unit
    }
    bad = {m: ds for m, ds in bad.items() if ds}
    assert not bad, f"{unit} may import only {sorted(ALLOWED[unit])} from fsmoe; found {bad}"


def test_every_unit_has_a_rule() -> None:
    units = {unit_of(m) for m in GRAPH}
    assert units <= set(ALLOWED), f"units without a layering rule: {sorted(units - set(ALLOWED))}"


def test_config_imports_nothing_from_fsmoe() -> None:
    config = [m for m in GRAPH if unit_of(m) == "config"]
    assert config, "no fsmoe.config found"
    bad = {m: sorted(d for d in GRAPH[m] if unit_of(d) != "config") for m in config}
    assert not any(bad.values()), f"fsmoe.config imports the rest of fsmoe: { {m: d for m, d in bad.items() if d} }"


def test_no_import_cycle_among_modules() -> None:
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_among_units() -> None:
    cycles = find_cycles(unit_graph(GRAPH))
    lines = []
    for cycle in cycles:  # name the module imports behind each step of the cycle
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:], strict=False):
            why = sorted(f"{m} imports {d}" for m in GRAPH for d in GRAPH[m] if unit_of(m) == a and unit_of(d) == b)
            lines.append(f"    {a} -> {b}: " + ", ".join(why))
    assert not cycles, "import cycles among fsmoe's units:\n" + "\n".join(lines)


# --- the checker itself can fail --------------------------------------------------------------------------


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
    assert find_cycles({"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"e"}, "e": {"d"}, "f": {"f"}}) == [
        ["a", "b", "a"], ["d", "e", "d"], ["f", "f"]
    ]
    assert find_cycles({"a": {"b"}, "b": {"c"}}) == []


def test_a_forbidden_import_anywhere_in_a_file_is_seen(tmp_path: Path) -> None:
    pkg = tmp_path / "fsmoe"
    (pkg / "moe").mkdir(parents=True)
    (pkg / "schedule").mkdir()
    for p in (pkg / "__init__.py", pkg / "moe" / "__init__.py", pkg / "schedule" / "__init__.py"):
        p.write_text("")
    (pkg / "moe" / "layer.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from fsmoe.schedule.pipelined import Pipeline\n"
        "def f():\n    from . import hooks\n    return torch.distributed.get_rank()\n"
    )
    (pkg / "moe" / "hooks.py").write_text("")
    (pkg / "schedule" / "pipelined.py").write_text("from ..moe.layer import f\n")
    graph, raw = import_graph(pkg)
    assert graph["fsmoe.moe.layer"] == {"fsmoe.schedule.pipelined", "fsmoe.moe.hooks"}
    assert graph["fsmoe.schedule.pipelined"] == {"fsmoe.moe.layer"}
    assert "torch.distributed" in raw["fsmoe.moe.layer"]
    assert find_cycles(graph) == [["fsmoe.moe.layer", "fsmoe.schedule.pipelined", "fsmoe.moe.layer"]]
    assert find_cycles(unit_graph(graph)) == [["moe", "schedule", "moe"]]
