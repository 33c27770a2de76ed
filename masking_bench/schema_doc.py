"""The suite schema as commented YAML: every field with its default, generated from the pydantic models.

The README's suite example (section "## Suites") is this text, and ``tests/test_defaults.py`` checks
that it stays so. After changing a field or a default, regenerate it::

    python -m masking_bench.schema_doc --write README.md

A field's comment is its pydantic ``Field(description=...)`` when it has one, else the entry in
:data:`COMMENTS`; a ``Literal`` field's comment starts with its accepted values. The required fields
(``strategies``, ``ratios``) show an example instead of a default.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .config import Suite

# values shown for the fields without a default (``name`` defaults to the suite file's stem in load_suite)
EXAMPLES: dict[str, Any] = {
    "name": "my_suite",
    "strategies": ["random", {"name": "block", "params": {"min_block": 4}, "label": "block-min4"}],
    "ratios": [0.6, 0.75, 0.9],
}

# dotted field -> comment (Field descriptions take precedence; tests check every key names a field)
COMMENTS: dict[str, str] = {
    "name": "default: the file's stem; names results/runs/<name>/ (letters, digits, _ . -)",
    "description": "free text",
    "method": "mae drops hidden tokens from the encoder, simmim replaces them with a mask token",
    "model": "a preset name, or {preset, overrides}",
    "model.preset": "",
    "model.overrides": "model fields to change, e.g. {depth: 6}",
    "data.root": "dataset folder (null: $MASKING_BENCH_DATA_DIR, else the built-in default)",
    "data.train_subset": "pre-train on a fixed seeded subset of this size (null: the whole train split)",
    "data.image_size": "imagefolder / synthetic image side in pixels (null: 224 / 28)",
    "data.storage": "auto (prepared for imagefolder, else memory) | memory | prepared (decoded file read by index)",
    "strategies": "required: names, or {name, params, label, ratios}",
    "ratios": "required: masking ratios in (0, 1)",
    "seeds": "integers 0-20000",
    "train.epochs": "pre-training epochs",
    "train.batch_size": "the global batch of one optimizer step (over all processes and micro-batches)",
    "train.accum_steps": "micro-batches per step and process (gradient accumulation); not part of identity",
    "train.base_lr": "learning rate per 256 images (scaled linearly with batch_size)",
    "train.warmup_epochs": "linear warm-up, then half-cosine to min_lr (per step)",
    "train.betas": "AdamW",
    "train.clip_grad": "gradient-norm clip (null: none)",
    "train.amp": "auto = bf16 where the hardware runs it natively, else fp32; none = fp32",
    "train.norm_pix_loss": "MAE's per-patch normalised pixel target",
    "train.augment": "random resized crop + horizontal flip",
    "train.augment.scale": "crop area as a fraction of the image",
    "train.augment.ratio": "crop aspect ratio (sampled log-uniformly)",
    "eval.pool": "encoder features: mean of the patch tokens or the cls token",
    "eval.probe": "linear probe on frozen features",
    "eval.probe.train_subset": "null: the whole train split",
    "eval.probe.test_subset": "null: the whole test split",
    "eval.knn": "weighted kNN on frozen features",
    "eval.low_shot": "probe and kNN with few labels per class, over fixed draws; null: off",
    "eval.low_shot.shots": "labelled images per class",
    "eval.low_shot.draws": "label draws averaged",
    "eval.low_shot.probe_steps": "AdamW steps of the probe head",
    "eval.finetune": "end-to-end fine-tuning (off unless enabled)",
    "eval.every": "also evaluate after every k-th epoch (convergence curves; null: at the end only)",
    "eval.every_protocols": "protocols evaluated at those epochs",
    "eval.random_init": "also evaluate an untrained encoder: the floor every strategy must beat",
    "grid": "extra axes: dotted field -> values, e.g. {train.epochs: [4, 8]}",
    "plugins": "strategy files, relative to the suite file",
    "device": "auto (cuda when present, else cpu) | cpu | cuda | cuda:N",
    "launcher": "where runs execute; never part of a run's identity",
    "launcher.nodes": "nodes of one run's DDP group (nodes x tasks_per_node processes)",
    "launcher.tasks_per_node": ">1: DDP with one process per task",
    "launcher.additional_parameters": "extra sbatch options",
    "launcher.folder": "submitit logs (null: <results>/submitit/<suite>)",
    "archive": "true: copy finished runs to results/records/<name>/ (committed to git)",
    "logging": "experiment loggers fed from metrics.jsonl rows; never part of a run's identity",
    "logging.tensorboard": "event files in <run>/tb/",
    "logging.wandb": "Weights & Biases, offline, in <run>/wandb/ (pip install wandb)",
}

COMMENT_COLUMN = 34  # comments start here unless the value is longer
README_SECTION = "## Suites"


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text  # YAML 1.1 needs the dot
    if isinstance(value, int):
        return str(value)
    return yaml.safe_dump(str(value), width=10_000).splitlines()[0]


def _flow(value: Any) -> str:
    """A plain value in YAML flow style (``[a, b]``, ``{k: v}``)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


def _choices(annotation: Any) -> list[Any] | None:
    """The accepted values of a ``Literal`` field (also inside ``Literal | None``)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        inner = _choices(arg)
        if inner is not None:
            return inner
    return None


def _comment(dotted: str, info, presets: list[str]) -> str:
    text = info.description or COMMENTS.get(dotted, "")
    choices = _choices(info.annotation)
    if dotted == "model.preset":
        choices = presets
    if choices:
        listed = " | ".join(str(c) for c in choices)
        text = f"{listed}: {text}" if text else listed
    return text


def _lines(model: BaseModel, prefix: str, indent: int, presets: list[str]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for name, info in type(model).model_fields.items():
        dotted = prefix + name
        value = EXAMPLES.get(dotted, getattr(model, name))
        head = " " * indent + f"{name}:"
        comment = _comment(dotted, info, presets)
        if isinstance(value, BaseModel):
            rows.append((head, comment))
            rows += _lines(value, dotted + ".", indent + 2, presets)
        else:
            rows.append((f"{head} {_flow(value)}", comment))
    return rows


def example_suite() -> Suite:
    """The suite the generated text describes: every default, plus :data:`EXAMPLES` for required fields."""
    return Suite.model_validate(EXAMPLES)


def render_default_suite() -> str:
    """Every suite field with its default value, as commented YAML (ends with a newline)."""
    from .catalog import model_schema

    presets, _ = model_schema()
    rows = _lines(example_suite(), "", 0, presets)
    out = []
    for text, comment in rows:
        if comment and len(text) >= COMMENT_COLUMN - 1:  # a long value: its comment goes on the line above
            out.append(" " * (len(text) - len(text.lstrip())) + f"# {comment}")
            out.append(text)
        else:
            out.append(f"{text.ljust(COMMENT_COLUMN - 1)} # {comment}" if comment else text)
    return "\n".join(line.rstrip() for line in out) + "\n"


def readme_block(text: str) -> tuple[int, int]:
    """(start, end) character offsets of the body of the first ```yaml block under "## Suites"."""
    section = text.find(f"\n{README_SECTION}\n")
    start = text.find("```yaml\n", section) if section >= 0 else -1
    end = text.find("```", start + 8) if start >= 0 else -1
    nxt = text.find("\n## ", section + 1)
    if start < 0 or end < 0 or (nxt >= 0 and start > nxt):
        raise ValueError(f"no ```yaml block under '{README_SECTION}'")
    return start + len("```yaml\n"), end


def update_readme(path: str | Path) -> bool:
    """Replace the README's suite example with the generated text; True if it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start, end = readme_block(text)
    new = text[:start] + render_default_suite() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    """``python -m masking_bench.schema_doc`` prints the text; ``--write README.md`` updates the README."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--write"] and len(argv) == 2:
        print(f"{argv[1]}: {'updated' if update_readme(argv[1]) else 'already up to date'}")
        return 0
    if argv:
        print("usage: python -m masking_bench.schema_doc [--write README.md]", file=sys.stderr)
        return 2
    print(render_default_suite(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
