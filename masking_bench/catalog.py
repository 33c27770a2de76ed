"""What ``list``, ``status`` and suite checks need to know about strategies and models, without torch.

Every strategy module imports torch (~3-5 s on a busy 2-core host), yet ``list`` and ``status`` only
need each strategy's metadata: its one-line summary, source, provenance, defaults and code digest
(:func:`masking_bench.fingerprint.strategy_digest`), and the model presets and fields. This module
serves them from a cache and imports the strategies only when the cache cannot answer.

- **Live** (``masking_bench.masking`` is already imported in this process, e.g. in ``run``, training
  or the tests): answers come from the registry itself, exactly as before the cache existed.
- **Cached** (otherwise): an entry per set of plugin files in ``$MASKING_BENCH_CACHE`` (default
  ``~/.cache/masking_bench``). An entry records the content digest (sha256 of the bytes) of every
  source file the registry was built from — every module loaded from outside the Python installation,
  every ``masking_bench`` module and every plugin file — the names of the built-in strategy modules
  and installed entry points, and ``sys.path``. Any change to any of them (a docstring included) is
  a miss. A miss builds the entry in a fresh subprocess (a clean registry) and stores it. When that
  fails (a plugin that does not import), or a name is not in the entry, or defaults are not plain
  JSON, the live path runs: the usual answer, or the usual one-line error.

Limit: files inside the Python installation (site-packages) are not hashed, except masking_bench's
own; an entry-point plugin is keyed by its distribution's name and version, so one reinstalled
under the same version is re-read after ``rm -r ~/.cache/masking_bench``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

CACHE_ENV = "MASKING_BENCH_CACHE"
ENTRY_POINT_GROUP = "masking_bench.strategies"  # = masking.ENTRY_POINT_GROUP (tests/test_startup.py)
FORMAT = 1
KEEP_ENTRIES = 64  # catalog files kept in the cache folder (oldest dropped first)
PACKAGE = Path(__file__).resolve().parent
PROVENANCES = ("faithful", "interpretation", "unlabelled")


@dataclass(frozen=True)
class StrategyInfo:
    """One registered strategy as ``list`` and ``status`` see it."""

    name: str
    summary: str  # MaskingStrategy.one_line()
    source: str
    provenance: str  # faithful | interpretation | unlabelled (see provenance())
    defaults: dict[str, Any]
    params: str  # the defaults as `list` shows them: k=repr(v), ...
    digest: str  # fingerprint.strategy_digest: the code part of every record of this strategy
    exact: bool  # the defaults survive JSON unchanged, so a cached copy may stand in for them


# ------------------------------------------------------------------------------ from classes


def _ours(module: str) -> bool:
    return module == "masking_bench" or module.startswith("masking_bench.")


def provenance(cls: type) -> str:
    """``faithful`` or ``interpretation`` as a strategy declares it; ``unlabelled`` when it does not.

    Built-in strategies (``masking_bench.*`` modules) are labelled by their ``interpretation``
    attribute, inherited default included. Any other class counts as declared only when it, or a
    base outside masking_bench, sets ``interpretation`` in its own class body: inheriting the
    contract's default (or a built-in's) says nothing about the plugin's fidelity.
    """
    declared = _ours(cls.__module__) or any(
        "interpretation" in vars(klass) for klass in cls.__mro__ if not _ours(klass.__module__)
    )
    if not declared:
        return "unlabelled"
    return "interpretation" if cls.interpretation else "faithful"


def _json_exact(value: Any) -> bool:
    """Plain JSON data that comes back from ``json.loads(json.dumps(.))`` equal and of the same types."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return all(_json_exact(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_exact(v) for k, v in value.items())
    return False


def _info(cls: type) -> StrategyInfo:
    from .fingerprint import strategy_digest

    exact = _json_exact(cls.defaults)
    return StrategyInfo(
        name=cls.name,
        summary=cls.one_line(),
        source=cls.source or "",
        provenance=provenance(cls),
        defaults=copy.deepcopy(cls.defaults) if exact else {},
        params=", ".join(f"{k}={v!r}" for k, v in cls.defaults.items()),
        digest=strategy_digest(cls),
        exact=exact,
    )


def _model_schema_live() -> dict[str, list[str]]:
    import inspect

    from .models import PRESETS, MIMViT

    return {"presets": list(PRESETS), "init_params": list(inspect.signature(MIMViT.__init__).parameters)}


# ------------------------------------------------------------------------------ cache keys


def cache_dir() -> Path:
    """``$MASKING_BENCH_CACHE``, else ``$XDG_CACHE_HOME/masking_bench``, else ``~/.cache/masking_bench``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "masking_bench"


def file_sha(path: str | Path) -> str | None:
    """sha256 of a file's bytes (None when it cannot be read)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _installation_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots |= {sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return sorted(os.path.realpath(r) + os.sep for r in roots if r)


def _source_files(plugins: list[str]) -> list[str]:
    """The files the registry was built from (see the module docstring), after it was built."""
    roots = _installation_roots()
    files = {os.path.realpath(p) for p in plugins}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if _ours(name) or name.startswith("masking_bench_plugin_") or not real.startswith(tuple(roots)):
            files.add(real)
    return sorted(files)


def _builtin_modules() -> list[str]:
    import pkgutil

    import masking_bench.strategies as builtin  # its __init__ is a docstring: no torch

    return sorted(info.name for info in pkgutil.iter_modules(builtin.__path__))


def _entry_points() -> list[list[str]]:
    rows = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        rows.append([ep.name, ep.value, getattr(dist, "name", "") or "", getattr(dist, "version", "") or ""])
    return sorted(rows)


def _key(plugins: tuple[str, ...]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "python": sys.version,
        "package": str(PACKAGE),
        "path": [os.path.realpath(p or os.getcwd()) for p in sys.path],  # where imports are looked up
        "plugins": sorted(plugins),
        "entry_points": _entry_points(),
        "builtin": _builtin_modules(),
    }


def _entry_path(key: dict[str, Any]) -> Path:
    blob = json.dumps(key, sort_keys=True).encode()
    return cache_dir() / f"catalog-{hashlib.sha256(blob).hexdigest()[:20]}.json"


# ------------------------------------------------------------------------------ build / read


def build(plugins: list[str]) -> dict[str, Any]:
    """Import the registry (and the plugins) in this process; the cache entry's content."""
    from . import masking

    for plugin in plugins:
        masking.load_plugin(plugin)
    strategies = {name: asdict(_info(cls)) for name, cls in masking.available().items()}
    model = _model_schema_live()
    return {
        "strategies": strategies,
        "model": model,
        "files": {path: file_sha(path) for path in _source_files(plugins)},
    }


def _build_main() -> None:
    """Subprocess entry: ``argv[1]`` = JSON list of plugin paths; prints the entry as JSON."""
    print(json.dumps(build(json.loads(sys.argv[1]))))


def _build_in_subprocess(plugins: tuple[str, ...]) -> tuple[dict[str, Any] | None, str]:
    code = (
        "import json, sys; sys.path[:0] = json.loads(sys.argv[2]); "
        "from masking_bench.catalog import _build_main; sys.argv = sys.argv[:2]; _build_main()"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(list(plugins)), json.dumps(sys.path)],
            capture_output=True,
            text=True,
            cwd=os.getcwd(),
        )
    except OSError:
        return None, ""
    if out.returncode != 0:
        return None, ""
    try:
        entry = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, ""
    return entry, out.stderr


def _valid(entry: Any, key: dict[str, Any]) -> bool:
    if not isinstance(entry, dict) or entry.get("key") != key:
        return False
    files = entry.get("files")
    if not isinstance(files, dict) or not files:
        return False
    names = {f.name for f in fields(StrategyInfo)}
    strategies, model = entry.get("strategies"), entry.get("model")
    if not isinstance(strategies, dict) or any(not isinstance(s, dict) or set(s) != names for s in strategies.values()):
        return False
    if not isinstance(model, dict) or not {"presets", "init_params"} <= set(model):
        return False
    return all(sha is not None and file_sha(path) == sha for path, sha in files.items())


def _write(path: Path, entry: dict[str, Any]) -> None:
    """Atomically (a temporary file, then a rename); a cache that cannot be written is no cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(entry, fh)
        os.replace(tmp, path)
        entries = sorted(path.parent.glob("catalog-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP_ENTRIES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


@functools.cache
def _cached(plugins: tuple[str, ...]) -> dict[str, Any] | None:
    """The valid cache entry for these plugin files (built on a miss); None: use the live path."""
    key = _key(plugins)
    path = _entry_path(key)
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        entry = None
    if _valid(entry, key):
        if entry.get("stderr"):
            print(entry["stderr"], end="", file=sys.stderr)  # e.g. a broken entry point's warning
        return entry
    built, stderr = _build_in_subprocess(plugins)
    if built is None:
        return None
    entry = {"key": key, **built, "stderr": stderr}
    if stderr:
        print(stderr, end="", file=sys.stderr)
    _write(path, entry)
    return entry


def _live() -> bool:
    return "masking_bench.masking" in sys.modules


def _entry(plugins: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
    paths = tuple(Path(p).resolve() for p in plugins)
    if _live() or any(p.suffix != ".py" or not p.is_file() for p in paths):
        return None  # the registry answers (a bad plugin path is its one-line error)
    return _cached(tuple(str(p) for p in paths))


# ------------------------------------------------------------------------------ public


def strategies(plugins: list[str] | tuple[str, ...] = ()) -> dict[str, StrategyInfo]:
    """Every strategy known with these plugin files loaded, by name (sorted)."""
    entry = _entry(plugins)
    if entry is not None:
        return {name: StrategyInfo(**info) for name, info in sorted(entry["strategies"].items())}
    from .masking import available, load_plugin

    for plugin in plugins:
        load_plugin(plugin)
    return {name: _info(cls) for name, cls in available().items()}


def strategy(name: str, plugins: list[str] | tuple[str, ...] = ()) -> StrategyInfo:
    """One strategy's metadata; an unknown name is the registry's one-line error."""
    entry = _entry(plugins)
    if entry is not None and name in entry["strategies"]:
        return StrategyInfo(**entry["strategies"][name])
    from .masking import get_strategy_class, load_plugin

    for plugin in plugins:
        load_plugin(plugin)
    return _info(get_strategy_class(name))


def defaults(name: str, plugins: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A fresh copy of a strategy's ``defaults`` (from the class itself when JSON cannot hold them)."""
    info = strategy(name, plugins)
    if info.exact:
        return copy.deepcopy(info.defaults)
    from .masking import get_strategy_class, load_plugin

    for plugin in plugins:
        load_plugin(plugin)
    return copy.deepcopy(get_strategy_class(name).defaults)


def digest(name: str, plugins: list[str] | tuple[str, ...] = ()) -> str:
    """The strategy's code digest (:func:`masking_bench.fingerprint.strategy_digest`)."""
    return strategy(name, plugins).digest


def model_schema() -> tuple[list[str], list[str]]:
    """(model preset names, parameter names of ``MIMViT.__init__``)."""
    entry = _entry(())
    model = entry["model"] if entry is not None else _model_schema_live()
    return list(model["presets"]), list(model["init_params"])
