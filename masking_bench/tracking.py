"""Optional experiment loggers fed from each run's metrics rows: TensorBoard event files and W&B offline.

``metrics.jsonl`` stays the source of truth: :meth:`masking_bench.store.RunRecord.append_metrics`
writes each row there first, then hands it to the run's :class:`Tracker`. Switched on per suite with
``logging: {tensorboard: true, wandb: false}`` (not part of any run's identity).

TensorBoard (``<run>/tb/``): one scalar per numeric key of a row at ``global_step = epoch`` —
``train/<key>`` (loss, lr, mask_ratio_mean/min/max, img_per_s, seconds, plan_share, loss terms) and
``eval/<metric>`` for each evaluation of the row. When a run (re)starts training, the event files of
earlier attempts are replaced by a replay of the rows ``metrics.jsonl`` keeps, so a resumed run shows
each epoch exactly once (also when logging was switched on half-way through a run). A row written
twice for the same epoch (the final row gains the final evaluations) only adds its new scalars.

W&B (``<run>/wandb/``, ``mode="offline"``; upload later with ``wandb sync``): the same keys per
epoch, ``epoch`` as the step metric; needs ``pip install wandb``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from .errors import BenchError

TB_FOLDER = "tb"
WANDB_FOLDER = "wandb"
_EVENT_GLOB = "events.out.tfevents.*"


def wandb_missing_message() -> str | None:
    """Why W&B logging cannot start here (None: ``wandb`` is importable)."""
    if importlib.util.find_spec("wandb") is None:
        return "logging.wandb is on but the wandb package is not installed: pip install wandb (or set wandb: false)"
    return None


def check_available(tensorboard: bool, wandb: bool) -> None:
    """A one-line :class:`BenchError` when an enabled logger's package is not installed."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise BenchError(
            "logging.tensorboard is on but the tensorboard package is not installed: pip install tensorboard "
            "(or set tensorboard: false)"
        )
    missing = wandb_missing_message() if wandb else None
    if missing:
        raise BenchError(missing)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The loggable numbers of a metrics row: ``train/<key>`` and ``eval/<metric>`` (``epoch`` is the step)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch":
            continue
        if key == "eval" and isinstance(value, dict):
            out.update({f"eval/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[f"train/{key}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Tracker:
    """The loggers of one run folder; :meth:`log` takes metrics rows, :meth:`close` flushes and ends."""

    def __init__(self, run_dir: Path, spec, tensorboard: bool, wandb: bool, replay: list[dict[str, Any]] = ()):
        check_available(tensorboard, wandb)
        self.run_dir = Path(run_dir)
        self._seen: dict[int, set[str]] = {}  # epoch -> tags already written
        self._tb = self._open_tensorboard() if tensorboard else None
        self._wandb = self._open_wandb(spec) if wandb else None
        # rows of earlier attempts: TensorBoard's files were replaced, so they are written again; W&B
        # got them from the earlier attempt (same run id), so they are only marked as written
        for row in replay:
            self._log_tensorboard(row["epoch"], self._new(row))
        if self._tb is not None:
            self._tb.flush()

    # ---- backends
    def _open_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run_dir / TB_FOLDER
        for old in folder.glob(_EVENT_GLOB) if folder.is_dir() else []:
            old.unlink()  # an earlier attempt's events: replaced by the replay of metrics.jsonl
        folder.mkdir(parents=True, exist_ok=True)
        return SummaryWriter(log_dir=str(folder))

    def _open_wandb(self, spec):
        import wandb

        folder = self.run_dir / WANDB_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            mode="offline",
            dir=str(self.run_dir),
            project="masking_bench",
            group=spec.suite,
            name=f"{spec.short()} [{spec.run_hash}]",
            id=f"{spec.suite}-{spec.run_hash}",
            resume="allow",
            config={"run_hash": spec.run_hash, **spec.model_dump(mode="json")},
            reinit="finish_previous",  # needs wandb >= 0.19.10 (the [wandb] extra)
            settings=wandb.Settings(silent=True),  # no console lines among the progress bars
        )
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")
        return run

    # ---- logging
    def _new(self, row: dict[str, Any]) -> dict[str, float]:
        """The scalars of ``row`` not yet written for its epoch (marked written)."""
        seen = self._seen.setdefault(row["epoch"], set())
        fresh = {tag: v for tag, v in scalars(row).items() if tag not in seen}
        seen.update(fresh)
        return fresh

    def _log_tensorboard(self, epoch: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, global_step=epoch)

    def log(self, row: dict[str, Any]) -> None:
        """Write one metrics row (an epoch already written only adds the scalars it did not have)."""
        if not isinstance(row.get("epoch"), int):
            return
        values = self._new(row)
        if not values:
            return
        self._log_tensorboard(row["epoch"], values)
        if self._tb is not None:
            self._tb.flush()  # every epoch on disk: a killed run keeps what it logged
        if self._wandb is not None:
            self._wandb.log({"epoch": row["epoch"], **values})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def open_tracker(record, rows: list[dict[str, Any]]) -> Tracker | None:
    """The loggers of ``record``'s run as its suite switched them on (None: none is on), primed with
    ``rows`` (the rows ``metrics.jsonl`` keeps from earlier attempts)."""
    cfg = getattr(record.spec, "logging", None)
    if cfg is None or not (cfg.tensorboard or cfg.wandb):
        return None
    rows = [r for r in rows if isinstance(r.get("epoch"), int)]
    return Tracker(record.dir, record.spec, cfg.tensorboard, cfg.wandb, replay=rows)
