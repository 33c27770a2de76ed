#!/usr/bin/env python
"""Mutation check: would the tests notice if a line that matters were wrong?

Each mutation below is an exact text replacement in one product file, together with the pytest
selection expected to catch it. The script copies the repository to a temporary folder (the working
tree's files that git tracks or does not ignore, or ``--source head``: the last commit), runs every
selection once unmutated (they must pass), then applies the mutations one at a time to the copy,
runs the mutation's selection (``-x -q``) with a timeout and reports ``caught`` / ``NOT caught``.
The repository itself is never modified.

    python scripts/mutation_check.py                 # all mutations, working tree
    python scripts/mutation_check.py --list          # names, files and selections
    python scripts/mutation_check.py --only warmup_halved --only store_direct_write
    python scripts/mutation_check.py --source head   # the last commit instead of the working tree

Exit status 0 when every mutation is caught, 1 when one survives (or its text is no longer in the
file: the mutation is stale and must be updated), 2 when the unmutated selections fail.
See docs/mutation_testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    why: str


MUTATIONS: tuple[Mutation, ...] = (
    # --- trainer
    Mutation(
        "seed_ignores_step",
        "masking_bench/step.py",
        "self.gen.manual_seed(mask_seed(spec.seed, epoch, step))",
        "self.gen.manual_seed(mask_seed(spec.seed, epoch, 0))",
        ("tests/test_train_step.py",),
        "every step of an epoch would plan from the same noise",
    ),
    Mutation(
        "mask_seed_drops_step",
        "masking_bench/step.py",
        "return ((seed * 7_919 + 17) * 1_000_003 + epoch) * 100_003 + step",
        "return ((seed * 7_919 + 17) * 1_000_003 + epoch) * 100_003",
        ("tests/test_train_step.py",),
        "the seed function itself forgets the step",
    ),
    Mutation(
        "warmup_halved",
        "masking_bench/step.py",
        "return peak * epoch / t.warmup_epochs",
        "return 0.5 * peak * epoch / t.warmup_epochs",
        ("tests/test_train_step.py",),
        "the warm-up would climb to half the peak learning rate",
    ),
    Mutation(
        "grad_clip_dropped",
        "masking_bench/step.py",
        "        if t.clip_grad:\n            torch.nn.utils.clip_grad_norm_(",
        "        if False:\n            torch.nn.utils.clip_grad_norm_(",
        ("tests/test_train_step.py",),
        "train.clip_grad silently ignored",
    ),
    Mutation(
        "accum_unscaled",
        "masking_bench/step.py",
        "(part / t.accum_steps).backward()",
        "part.backward()",
        ("tests/test_prepared_training.py::test_accumulation_keeps_the_hash_masks_and_losses",),
        "gradient accumulation would sum the micro-batches' gradients instead of averaging them",
    ),
    Mutation(
        "prepared_order_unshuffled",
        "masking_bench/prepared_loader.py",
        "perm = epoch_order(self.n, self.seed, epoch, self.shuffle).numpy()",
        "perm = np.arange(self.n)",
        ("tests/test_prepared_training.py::test_prepared_storage_gives_the_numbers_of_memory",),
        "training from prepared data would read the images in file order, not the seeded epoch order",
    ),
    # --- store
    Mutation(
        "store_direct_write",
        "masking_bench/store.py",
        "    atomic_write_bytes(path, text.encode())",
        "    path.parent.mkdir(parents=True, exist_ok=True)\n    path.write_text(text)",
        ("tests/test_store_atomic.py",),
        "config/metrics/summary/status written in place: a kill leaves half a file",
    ),
    Mutation(
        "store_no_fsync",
        "masking_bench/store.py",
        "os.fsync(fh.fileno())",
        "pass  # no fsync",
        ("tests/test_store_atomic.py",),
        "the rename may reach the disk before the data (empty file after a power cut)",
    ),
    # --- strategies and the contract
    Mutation(
        "block_min_doubled",
        "strategies/block_masking.py",
        "max(1, round(16 * gh * gw / 196))",
        "max(1, round(32 * gh * gw / 196))",
        ("tests/test_masking.py",),
        "BEiT's minimum block (16 patches of 14x14, 4 on 7x7) doubled",
    ),
    Mutation(
        "num_hidden_rounds",
        "masking_bench/masking.py",
        "return num_tokens - int(num_tokens * (1 - ratio))",
        "return num_tokens - round(num_tokens * (1 - ratio))",
        ("tests/test_masking.py",),
        "MAE keeps int(L(1-r)) tokens (truncation), not round()",
    ),
    Mutation(
        "plan_check_allows_nothing_hidden",
        "masking_bench/masking.py",
        "if low < 1 or high > num_tokens - 1:",
        "if low < 0 or high > num_tokens - 1:",
        ("tests/test_masking.py",),
        "a plan hiding no token of a sample would pass the contract check",
    ),
    Mutation(
        "sbam_hides_least_salient",
        "strategies/sbam.py",
        "scores = sal.to(noise.device) + noise",
        "scores = -sal.to(noise.device) + noise",
        ("tests/test_sbam.py",),
        "SBAM must hide the MOST salient tokens first",
    ),
    Mutation(
        "mto_no_isolation",
        "strategies/mto.py",
        "isolate_mask_tokens=bool(self.recalibrate)",
        "isolate_mask_tokens=False",
        ("tests/test_mto.py",),
        "MTO's recalibration (visible queries ignore mask tokens) switched off",
    ),
    Mutation(
        "misalign_centre_weight",
        "strategies/misalign.py",
        '"recon_centre": float(self.centre_weight) * centre',
        '"recon_centre": float(self.border_weight) * centre',
        ("tests/test_misalign.py",),
        "the 0.8 centre weight replaced by the border's 0.2",
    ),
    # --- model, evaluation, report
    Mutation(
        "norm_pix_without_sqrt",
        "masking_bench/models.py",
        "target = (target - mean) / (var + 1e-6) ** 0.5",
        "target = (target - mean) / (var + 1e-6)",
        ("tests/test_models.py",),
        "MAE's per-patch target divided by the variance instead of the std",
    ),
    Mutation(
        "knn_ignores_temperature",
        "masking_bench/evaluate.py",
        "(top_sim / temperature).exp()",
        "top_sim.exp()",
        ("tests/test_evaluate.py",),
        "kNN votes not weighted by exp(sim / 0.07)",
    ),
    Mutation(
        "paired_delta_unpaired",
        "masking_bench/metrics.py",
        "on = list(keys) + [seed]",
        "on = list(keys)",
        ("tests/test_metrics.py",),
        "Δ vs random no longer paired by seed (every seed against every seed)",
    ),
)

IGNORED_PARTS = {".git", ".venv", "__pycache__", ".pytest_cache"}


def copy_repo(dest: Path, source: str) -> None:
    """The working tree's tracked and not-ignored files (``worktree``) or the last commit (``head``)."""
    if source == "head":
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    listed = (
        subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in sorted({p for p in listed if p}):
        src = REPO / rel
        if IGNORED_PARTS & set(Path(rel).parts) or not (src.is_symlink() or src.exists()):
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        elif src.is_file():
            shutil.copy2(src, target)


def pytest(root: Path, args: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """Run ``pytest -x -q ARGS`` in the copy -> (outcome, seconds, last output line)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, f"no result within {timeout:.0f} s"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    first_failure = next((line for line in lines if line.startswith(("FAILED ", "ERROR "))), None)
    tail = first_failure or (lines[-1] if lines else "")
    outcome = {0: "passed", 1: "failed", 2: "interrupted", 5: "no tests"}.get(proc.returncode, f"rc {proc.returncode}")
    return outcome, time.perf_counter() - t0, tail


def check_imports(root: Path) -> None:
    """The copy's package must be the one imported (not the editable install of the repository)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    code = (
        "import masking_bench.train, masking_bench.strategies.block_masking as b; "
        "print(masking_bench.train.__file__); print(b.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    for line in out.stdout.split():
        if not Path(line).resolve().is_relative_to(root.resolve()):
            sys.exit(f"mutation_check: the copy imports {line}, not its own code; is PYTHONPATH honoured?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--source",
        choices=("worktree", "head"),
        default="worktree",
        help="copy the working tree (default) or the last commit",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.file:30} {' '.join(m.tests)}\n{'':34} {m.why}")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="mutation_check_"))
    root = tmp / "repo"
    try:
        copy_repo(root, args.source)
        check_imports(root)
        print(f"copy of the {args.source} in {root}", flush=True)

        stale = []
        for m in chosen:
            count = (root / m.file).read_text().count(m.old)
            if count != 1:
                stale.append(m)
                print(
                    f"STALE      {m.name}: its text occurs {count} times in {m.file}; update the mutation", flush=True
                )

        selections = sorted({arg for m in chosen for arg in m.tests})
        outcome, secs, tail = pytest(root, tuple(selections), args.timeout * 2)
        print(f"baseline   {outcome} in {secs:.0f} s ({' '.join(selections)}): {tail}", flush=True)
        if outcome != "passed":
            print("mutation_check: the unmutated selections must pass first", file=sys.stderr)
            return 2

        survivors, rows = [], []
        for m in chosen:
            if m in stale:
                continue
            path = root / m.file
            pristine = path.read_text()
            path.write_text(pristine.replace(m.old, m.new, 1))
            try:
                outcome, secs, tail = pytest(root, m.tests, args.timeout)
            finally:
                path.write_text(pristine)
            caught = outcome in ("failed", "interrupted", "timeout")
            verdict = "caught" if caught else "NOT caught"
            if not caught:
                survivors.append(m)
            rows.append((m.name, verdict, outcome, secs))
            print(f"{verdict:10} {m.name:34} {outcome:11} {secs:5.0f} s  {tail}", flush=True)

        print(
            f"\n{len(rows) - len(survivors)} of {len(rows)} mutations caught"
            + (f"; NOT caught: {', '.join(m.name for m in survivors)}" if survivors else "")
            + (f"; stale: {', '.join(m.name for m in stale)}" if stale else "")
        )
        return 1 if survivors or stale else 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
