"""Fingerprints of the code that produces a run's numbers, and how a record's fingerprint is judged.

A run's folder is named by its resolved parameters (:meth:`RunSpec.identity`); the code is stamped
into its records instead (``summary.json`` and the checkpoint), part by part:

- ``strategy``: the source files of the strategy class and of its bases (not the contract);
- ``model``, ``trainer``, ``data``, ``evaluation`` (+ ``finetune`` when enabled), ``contract``: the
  engine modules whose code reaches the numbers.

Each part is hashed over its *normalised* source: the Python AST without docstrings and type
annotations, printed back with :func:`ast.unparse`. Comments, docstrings, type hints and formatting
never change a fingerprint; any other change of code does. Each file is read once per process, at
the first fingerprint (the engine's when this module is imported, a strategy's when it registers),
so an edit made while a run trains cannot be stamped onto that run. A record whose stamp differs
from the current code is *stale*: ``status`` names the parts, ``run`` retrains it, ``report`` marks
it. ``certify`` proves a refactor harmless by rerunning a few cells bit-for-bit and then re-stamps
the records (see the README, "Run records").
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

ENGINE = Path(__file__).resolve().parent
ENGINE_PARTS: dict[str, tuple[str, ...]] = {
    "model": ("models.py",),
    "trainer": ("train.py", "step.py"),
    "data": ("data.py", "prepared.py", "prepared_loader.py"),
    "evaluation": ("evaluate.py",),
    "contract": ("masking.py",),
}
FINETUNE_PART = ("finetune", ("finetune.py",))


def _strip_non_code(tree: ast.AST) -> ast.AST:
    """Remove docstrings and type annotations of signatures and assignments (they never reach a number)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        elif isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, ast.AnnAssign):
            node.annotation = ast.Name(id="_", ctx=ast.Load())
    return tree


def normalised_source(text: str) -> str:
    """The code of a Python source text without comments, docstrings, type annotations or formatting."""
    return ast.unparse(_strip_non_code(ast.parse(text)))


@functools.cache
def file_digest(path: str | Path) -> str:
    """Digest of a source file's normalised code, read once per process: a file edited while the
    process runs keeps the digest of the code this process loaded.

    Normalising costs an AST parse per file (~0.1 s for the engine at start-up), so the digest is
    also remembered on disk by the sha256 of the file's exact bytes (and the Python version, whose
    ``ast.unparse`` defines the normal form): the same bytes always give the same digest."""
    text = Path(path).read_text(encoding="utf-8")
    raw = f"{sys.version_info[0]}.{sys.version_info[1]}:{hashlib.sha256(text.encode()).hexdigest()}"
    known = _digest_memo().get(raw)
    if isinstance(known, str):
        return known
    try:
        canon = normalised_source(text)
    except SyntaxError:
        canon = text
    digest = hashlib.sha256(canon.encode()).hexdigest()[:12]
    _remember_digest(raw, digest)
    return digest


MEMO_SIZE = 512  # digests kept on disk (the most recent)


def _memo_path() -> Path:
    from .catalog import cache_dir

    return cache_dir() / "code-digests.json"


@functools.cache
def _digest_memo() -> dict[str, str]:
    try:
        memo = json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _remember_digest(raw: str, digest: str) -> None:
    """Add one digest to the on-disk memo (atomic rename; a memo that cannot be written is no memo)."""
    memo = _digest_memo()
    memo[raw] = digest
    while len(memo) > MEMO_SIZE:
        memo.pop(next(iter(memo)))
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        pass


def _digest_files(paths: list[Path]) -> str:
    if len(paths) == 1:
        return file_digest(str(paths[0]))
    joined = ",".join(f"{p.name}:{file_digest(str(p))}" for p in paths)
    return hashlib.sha256(joined.encode()).hexdigest()[:12]


def engine_parts(finetune: bool = False) -> dict[str, str]:
    parts = dict(ENGINE_PARTS)
    if finetune:
        parts[FINETUNE_PART[0]] = FINETUNE_PART[1]
    return {name: _digest_files([ENGINE / f for f in files]) for name, files in parts.items()}


def strategy_files(cls: type) -> list[Path]:
    """Source files of a strategy class and of its bases, except the contract module and builtins."""
    from .masking import MaskingStrategy

    files: list[Path] = []
    for klass in cls.__mro__:
        if klass in (MaskingStrategy, object) or not issubclass(klass, MaskingStrategy):
            continue
        try:
            path = Path(inspect.getfile(klass)).resolve()
        except (TypeError, OSError):
            continue
        if path not in files:
            files.append(path)
    return files


def strategy_digest(cls: type) -> str:
    """Digest of a strategy's code; :func:`masking_bench.masking.register` takes it when the class registers."""
    files = strategy_files(cls)
    return _digest_files(files) if files else "unknown"


def code_fingerprint(spec) -> dict[str, str]:
    """Part -> digest of the code that produces ``spec``'s numbers (strategy first for a pre-training run)."""
    parts: dict[str, str] = {}
    if spec.kind == "pretrain":
        from .catalog import digest  # the registry's strategy_digest, or its cached copy (no torch import)

        parts["strategy"] = digest(spec.strategy.name, spec.plugins)
    parts.update(engine_parts(finetune=spec.eval.finetune.enabled))
    return parts


def changed_parts(recorded: dict[str, Any] | None, current: dict[str, str]) -> list[str]:
    """Names of the parts whose code differs; ``["(no fingerprint)"]`` for a record made before stamps."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("parts"), dict):
        return ["(no fingerprint)"]
    old = recorded["parts"]
    return [name for name in sorted(set(old) | set(current)) if old.get(name) != current.get(name)]


def describe_change(names: list[str], spec) -> str:
    if names == ["(no fingerprint)"]:
        return "recorded before code fingerprints"
    shown = [f"strategy '{spec.strategy.name}'" if n == "strategy" else n for n in names]
    return "code changed: " + ", ".join(shown)


engine_parts()  # read the engine's files now, beside the imports of the code they describe
