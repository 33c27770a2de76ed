"""``python -m masking_bench status SUITE.yaml``: each run's state from its record, with SLURM job ids;
``plan SUITE.yaml`` (= ``run --dry-run``): what ``run`` would do with each run, from the same states;
``plan --cost`` adds each run's FLOPs, GPU-hours and memory per GPU (masking_bench/plan_cost.py).

States: done, stale (finished by code that has changed since; the reason names the parts), running,
pending, failed.

Reads only the run records (``status.json``, ``metrics.jsonl``); when records name SLURM jobs and
``sacct`` is available, one ``sacct`` call adds the scheduler's view of those jobs, which reveals
records whose job ended without a word (cancelled while queued, killed, node failure).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from .config import RunSpec
from .store import RunRecord

STATE_ORDER = ("done", "stale", "running", "pending", "failed")
_SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def run_rows(specs: list[RunSpec], results: Path) -> list[dict[str, Any]]:
    """One dict per run: hash, run, state, epochs, job id, restarts, reason or note."""
    rows = []
    for spec in specs:
        record = RunRecord(results, spec)
        st = record.status()
        state = st.get("state", "pending")
        if state == "done" and not record.is_finished():
            state = "pending"  # a status without its summary is not a finished run
        stale = record.stale_reason() if state == "done" else None
        if stale:
            state = "stale"  # finished, by code that has changed since: `run` retrains it
        if state == "running" and not st.get("job_id") and not record.holder_alive():
            # a local run's status outlived its process (kill -9, full disk, power): nobody holds the lock
            state = "pending"
            st = {
                **st,
                "note": f"interrupted (was running as pid {st.get('pid', '?')} on {st.get('host', '?')}; "
                "no process holds its lock): `run` resumes it from its last epoch",
            }
        epochs = spec.train.epochs if spec.kind == "pretrain" else 0
        done_epochs = min(len(record.read_metrics()), epochs) if epochs else 0
        rows.append(
            {
                "hash": spec.run_hash,
                "run": spec.short(),
                "state": state,
                "epochs": f"{done_epochs}/{epochs}" if epochs else "-",
                "job_id": st.get("job_id") or "",
                "restarts": st.get("restarts", 0),
                "reason": st.get("reason", "")
                if state == "failed"
                else stale
                if stale
                else ("archived record (results/records)" if st.get("archived") else st.get("note", "")),
                "updated": st.get("updated", ""),
            }
        )
    return rows


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Latest SLURM state per job id (``12`` or array task ``12_3``) from one ``sacct`` call; {} if unavailable."""
    ids = sorted({j for j in job_ids if j and not j.startswith("DEBUG")})
    if not ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            states[job.strip()] = state.strip().split()[0] if state.strip() else ""
    return states


def annotate_with_slurm(rows: list[dict[str, Any]]) -> bool:
    """Add a ``slurm`` column; flag records whose job ended while the record still waits. True if any."""
    states = slurm_states([r["job_id"] for r in rows])
    if not states:
        return False
    for row in rows:
        sstate = states.get(row["job_id"], "")
        row["slurm"] = sstate
        if row["state"] in ("pending", "running") and sstate in _SLURM_ENDED:
            row["reason"] = f"job {row['job_id']} ended {sstate} without finishing the run; the next `run` resubmits it"
    return True


def format_status(rows: list[dict[str, Any]], suite: str, where: Path, with_slurm: bool = False) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in STATE_ORDER}
    head = f"suite '{suite}': {len(rows)} runs - " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"  ({where})"
    cols = ["hash", "run", "state", "epochs", "job_id"] + (["slurm"] if with_slurm else []) + ["restarts"]
    titles = {"hash": "run hash", "job_id": "job", "restarts": "requeued"}
    table = [[titles.get(c, c) for c in cols] + ["reason / note"]]
    for r in rows:
        table.append(
            [str(r.get(c, "")) if c != "restarts" else (str(r[c]) if r[c] else "") for c in cols] + [r["reason"]]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = [head]
    for line in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1])
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------- plan

# (row key, column title) of the plan table; the cost columns stay empty, hence hidden, unless
# add_costs filled them (``plan --cost``; masking_bench/plan_cost.py)
PLAN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("hash", "run hash"),
    ("strategy", "strategy"),
    ("ratio", "ratio"),
    ("seed", "seed"),
    ("variant", "grid"),
    ("state", "state"),
    ("epochs", "epochs"),
    ("gflops", "GFLOP/img"),
    ("pflop", "PFLOP"),
    ("gpu_h", "GPU-h"),
    ("mem_gb", "mem/GPU"),
    ("action", "run would"),
)


_MISSING = object()


def _grid_values(spec: RunSpec, axes: list[str]) -> str:
    """``train.base_lr=0.001, ...``: the spec's value on each grid axis of its suite that is part of
    its identity (an untrained floor has no training recipe)."""
    parts = []
    for dotted in axes:
        node: Any = spec.identity()
        for key in dotted.split("."):
            node = node.get(key, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            parts.append(f"{dotted}={node}")
    return ", ".join(parts)


def plan_rows(
    specs: list[RunSpec], results: Path, accept_stale: bool = False, grid: list[str] | None = None
) -> list[dict[str, Any]]:
    """:func:`run_rows` plus strategy, ratio, seed, grid values and what ``run`` would do (``action``):
    ``train``/``resume``/``retrain`` (pending, failed, or stale unless ``accept_stale``), ``evaluate``
    (an untrained floor not done yet), ``skip`` (done) or ``leave`` (running in another process); ``to_train``
    counts all but the last two. Reads the records only; writes nothing."""
    rows = run_rows(specs, results)
    for spec, row in zip(specs, rows, strict=True):
        done_epochs = int(row["epochs"].split("/")[0]) if row["epochs"] != "-" else 0
        state = row["state"]
        if state == "done" or (state == "stale" and accept_stale):
            action = "skip" + (" (stale accepted)" if state == "stale" else "")
        elif state == "running":
            action = "leave (its process trains it)"
        elif state == "pending" and done_epochs:
            action = f"resume at epoch {done_epochs}"
        elif spec.kind == "random_init":
            action = "evaluate (untrained)"
        else:
            action = "retrain" if state == "stale" else "train"
        row.update(
            strategy=spec.label,
            ratio="-" if spec.ratio is None else f"{spec.ratio:g}",
            seed=spec.seed,
            variant=_grid_values(spec, grid) if grid else "",
            action=action,
            to_train=action.startswith(("train", "resume", "retrain", "evaluate")),
        )
    return rows


def add_costs(
    rows: list[dict[str, Any]],
    specs: list[RunSpec],
    world: int = 1,
    gpu_tflops: float | None = None,
    mfu: float | None = None,
    log=None,
) -> list[str]:
    """Fill each plan row's cost columns (FLOPs per image, PFLOP, GPU-hours, peak memory per GPU) and
    return the footer lines that total them and state what is counted (masking_bench/plan_cost.py).
    ``world``: DDP processes sharing one run's batch; ``log``: called before each slow measurement."""
    from .plan_cost import DEFAULT_GPU_TFLOPS, DEFAULT_MFU, Estimator, cost_footer

    tflops = DEFAULT_GPU_TFLOPS if gpu_tflops is None else gpu_tflops
    mfu = DEFAULT_MFU if mfu is None else mfu
    estimator = Estimator(log=log)
    try:
        for spec, row in zip(specs, rows, strict=True):
            row.update(estimator.run_cost(spec, world, tflops, mfu))
    finally:
        estimator.save()
    return cost_footer(rows, specs, world, tflops, mfu)


def format_table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> list[str]:
    """Left-aligned text columns, the last one unpadded; a column empty in every row is left out."""
    shown = [(k, t) for k, t in columns if any(str(r.get(k, "")) for r in rows)]
    table = [[t for _, t in shown]] + [[str(r.get(k, "")) for k, _ in shown] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(shown))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]


def format_plan(
    rows: list[dict[str, Any]],
    suite: str,
    where: Path,
    launcher: str,
    columns: tuple[tuple[str, str], ...] = PLAN_COLUMNS,
    footer: list[str] | None = None,
) -> str:
    """The plan table and its total line: ``total: N to train, M done``; then ``footer`` (the costs)."""
    trained = [r["state"] for r in rows if r["to_train"]]
    skipped = sum(r["action"].startswith("skip") for r in rows)
    running = sum(r["state"] == "running" for r in rows)
    head = f"plan for suite '{suite}': {len(rows)} runs -> {where} (launcher: {launcher}); nothing trained or written"
    detail = ", ".join(f"{trained.count(s)} {s}" for s in ("pending", "failed", "stale") if trained.count(s))
    total = f"total: {len(trained)} to train" + (f" ({detail})" if detail else "") + f", {skipped} done"
    if running:
        total += f", {running} running elsewhere"
    return "\n".join([head, *format_table(rows, columns), total, *(footer or [])])
