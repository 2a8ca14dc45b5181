"""One rank of :meth:`fsmoe.cluster.launcher.EmulatedCluster.run_function`.

``python -m fsmoe.cluster.worker MODULE:FUNCTION`` (or ``/path/script.py:FUNCTION``), started by the
launcher inside a node's namespace with the torchrun variables set, plus:

* ``FSMOE_CLUSTER_CALL``: a pickle of ``{"sys_path", "target", "args", "timeout"}``, where ``args`` is
  itself a pickle of ``(args, kwargs)``, unpickled only after ``sys.path`` is the caller's;
* ``FSMOE_CLUSTER_RESULTS``: the folder where rank r writes ``result-r.pkl``: ``(True, pickled value)``
  or ``(False, traceback text)``.

The rank joins ``init_process_group("gloo")`` from the environment, calls
``FUNCTION(rank, world_size, *args, **kwargs)``, writes its result and leaves. A failing rank exits 1
at once without leaving the group: the others may be blocked in it, and the launcher stops them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

_MAIN_ALIAS = "__fsmoe_cluster_main__"


def result_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"result-{rank}.pkl"


def read_result(folder: str | Path, rank: int) -> tuple[bool, Any, float] | None:
    """Rank ``rank``'s ``(ok, payload, written_at)`` (``time.time()``), or None when it wrote none."""
    try:
        data = result_path(folder, rank).read_bytes()
    except FileNotFoundError:
        return None
    ok, payload, written_at = pickle.loads(data)
    return bool(ok), payload, float(written_at)


def _write_result(folder: str, rank: int, ok: bool, payload: Any) -> None:
    path = result_path(folder, rank)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps((ok, payload, time.time())))
    os.replace(tmp, path)  # the launcher never reads half a file


def resolve(target: str) -> Callable[..., Any]:
    """``pkg.mod:func`` or ``/path/script.py:Class.func`` -> the function."""
    module_name, sep, qualname = target.rpartition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"expected MODULE:FUNCTION or /path/script.py:FUNCTION, got {target!r}")
    if module_name.endswith(".py"):
        # A function of the caller's script: load it as multiprocessing's spawn does, under another name
        # (its `if __name__ == "__main__":` block does not run) and alias it as __main__ for unpickling.
        spec = importlib.util.spec_from_file_location(_MAIN_ALIAS, module_name)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {module_name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MAIN_ALIAS] = module
        spec.loader.exec_module(module)
        sys.modules["__main__"] = module
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m fsmoe.cluster.worker MODULE:FUNCTION", file=sys.stderr)
        return 2
    results = os.environ["FSMOE_CLUSTER_RESULTS"]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        call = pickle.loads(Path(os.environ["FSMOE_CLUSTER_CALL"]).read_bytes())
        sys.path[:] = call["sys_path"]  # before unpickling: fn and its arguments may live in test modules
        fn = resolve(argv[0])
        args, kwargs = pickle.loads(call["args"])

        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=call["timeout"]))
        value = pickle.dumps(fn(rank, world_size, *args, **kwargs))
    except BaseException:  # noqa: BLE001 - everything goes back to the launcher
        _write_result(results, rank, False, traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # do not tear the group down: peers may be blocked in it
    _write_result(results, rank, True, value)
    # Leave without tearing anything down: the result is in, and libraries loaded by ``fn`` (DeepSpeed)
    # have aborted ranks in their C++ teardown at exit ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
