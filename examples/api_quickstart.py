"""The Python API in one go: run a small suite, read its records, plan masks, embed images.

    python examples/api_quickstart.py [--results DIR]

Runs the shipped smoke suite shrunk with overrides (one epoch on 1024 Fashion-MNIST images, one
ratio) into a temporary results folder unless --results is given; about a minute on a laptop CPU.
See README "What you do with it". The calls are the same in a notebook.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import masking_bench as mb

REPO = Path(__file__).resolve().parent.parent

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--results", type=Path, default=None, help="results folder (default: a temporary one)")
args = parser.parse_args()
results = args.results or Path(tempfile.mkdtemp(prefix="masking_bench_api_"))

# 1. a suite: the shipped file, with --set-style overrides (validated and hashed like the file)
suite = mb.load_suite(
    REPO / "suites" / "smoke.yaml",
    overrides=[
        "data.train_subset=1024",
        "train.epochs=1",
        "train.batch_size=128",
        "ratios=[0.75]",
        "eval.probe={epochs: 10, train_subset: 1000, test_subset: 500}",
    ],
)
print(f"suite {suite.name}: strategies {[s.name for s in suite.strategies]}, ratios {suite.ratios}")

# 2. run it (finished runs are skipped: a second call returns at once) and read its records
df = mb.run(suite, results=results, progress=False)
print(f"records: {len(df)} runs in {results}")
print(df[["strategy", "ratio", "seed", "run_hash", "probe_top1", "knn_top1"]].to_string(index=False))

# 3. masks of a strategy on a few test images (True = hidden patch)
images, labels = mb.load_images("fashion_mnist", n=8)
mask, plan = mb.plan_masks(mb.build_strategy("block", 0.75), images, seed=0)
print(f"block masks: {tuple(mask.shape)}, hidden ratio {mask.float().mean().item():.3f}")

# 4. the encoder a run trained, and the features of a batch
row = df[(df["kind"] == "pretrain") & (df["strategy"] == "random")].iloc[0]
encoder = mb.load_encoder(results / "runs" / row["suite"] / row["run_hash"])
features = encoder(images)
print(f"encoder of run {row['run_hash']}: {encoder.epochs_done} epoch(s), features {tuple(features.shape)}")

# the trained encoder's own view of which patches to hide (salience strategies read it)
mask, _ = mb.plan_masks(mb.build_strategy("random", 0.6), images, model=encoder, seed=1)
print(f"random masks planned with the trained encoder: hidden ratio {mask.float().mean().item():.3f}")
