"""Data-parallel pre-training on CPU (gloo, 2 processes) follows the single-process loss curve."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ctx_for

from masking_bench.config import expand, parse_suite
from masking_bench.store import RunRecord

REPO = Path(__file__).resolve().parent.parent

WORKER = """
import json, sys, torch
torch.set_num_threads(1)
from masking_bench.config import RunSpec
from masking_bench.store import RunRecord
from masking_bench.train import train_run
spec = RunSpec.model_validate(json.loads(open(sys.argv[1]).read()))
summary = train_run(spec, RunRecord(sys.argv[2], spec))
if summary is not None:
    open(sys.argv[3], "w").write(json.dumps(summary))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec_path: Path, results: Path, out: Path, world: int) -> None:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(spec_path), str(results), str(out)],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_two_process_gloo_matches_single_process(tmp_path, strategy):
    suite = parse_suite(
        {
            "name": "ddp",
            "data": {"name": "synthetic"},
            "strategies": [strategy],
            "ratios": [0.75],
            "train": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0.5},
            "eval": {"random_init": False, "low_shot": None, "probe": {"epochs": 2}},
        }
    )
    (spec,) = expand(suite)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())

    launch(spec_path, tmp_path / "single", tmp_path / "single.json", world=1)
    launch(spec_path, tmp_path / "ddp", tmp_path / "ddp.json", world=2)

    single = RunRecord(tmp_path / "single", spec).read_metrics()
    ddp = RunRecord(tmp_path / "ddp", spec).read_metrics()
    assert [r["epoch"] for r in ddp] == [0, 1] == [r["epoch"] for r in single]
    for a, b in zip(single, ddp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["mask_ratio_mean"] == b["mask_ratio_mean"]
    # only rank 0 wrote a summary, and training happened in both
    assert json.loads((tmp_path / "ddp.json").read_text())["epochs"] == 2
    assert single[-1]["loss"] < single[0]["loss"] * 1.5


def test_each_rank_computes_only_its_share_of_the_global_plan():
    import torch

    from masking_bench.masking import build_strategy
    from masking_bench.models import build_model
    from masking_bench.step import DistInfo, forward_losses

    torch.manual_seed(0)
    model = build_model("cpu-tiny", "mae", 28, 1)
    strategy = build_strategy("random", 0.75)
    x = torch.randn(8, 1, 28, 28)
    seen = []

    def forward(view, mask, **kw):
        seen.append((view.clone(), mask.clone()))
        return model(view, mask, **kw)

    plans = []
    for rank in (0, 1):
        ctx = ctx_for(model, 3)
        _, _, plan, _ = forward_losses(model, strategy, ctx, x, None, DistInfo(rank, 2), forward)
        plans.append(plan)
    assert torch.equal(plans[0].mask, plans[1].mask)  # the same global plan on every rank
    assert torch.equal(seen[0][0], x[:4]) and torch.equal(seen[1][0], x[4:])
    assert torch.equal(seen[0][1], plans[0].mask[:4]) and torch.equal(seen[1][1], plans[0].mask[4:])
