"""Sections of the suite schema (:mod:`masking_bench.config`): augmentation, evaluation protocols,
launcher and logging. Only augmentation and evaluation reach a run's numbers (and its identity)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from .values import Float, Int, PathText, Plain, StrictModel


class AugmentConfig(StrictModel):
    scale: tuple[Float, Float] = (0.2, 1.0)  # crop area as a fraction of the image
    ratio: tuple[Float, Float] = (3 / 4, 4 / 3)  # crop aspect ratio (sampled log-uniformly)
    flip: bool = True

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value):
        low, high = value
        if not (0 < low <= 1 and 0 < high <= 1):
            raise ValueError("crop scale values are fractions of the image area, each in (0, 1]")
        if low > high:
            raise ValueError("crop scale is [low, high] with low <= high")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, value):
        low, high = value
        if not (low > 0 and high > 0):
            raise ValueError("crop aspect ratios must be > 0")
        if low > high:
            raise ValueError("crop aspect ratio is [low, high] with 0 < low <= high")
        return value


class ProbeConfig(StrictModel):
    # lr 1e-2 / 100 epochs: chosen on a held-out part of the *train* split (10k probe-train images vs
    # 4k others; one trained checkpoint and one untrained encoder), where 1e-3 / 30 epochs underfit by
    # ~7 points. Never on the test split. See README "Evaluation recipe".
    epochs: Int = Field(100, gt=0)
    batch_size: Int = Field(256, gt=0)
    lr: Float = Field(1e-2, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    train_subset: Int | None = Field(None, gt=0)
    test_subset: Int | None = Field(None, gt=0)


class KnnConfig(StrictModel):
    k: Int = Field(20, gt=0)
    temperature: Float = Field(0.07, gt=0)


class LowShotConfig(StrictModel):
    """Linear probe and kNN with few labels per class, averaged over fixed label draws (same for every run)."""

    shots: list[Annotated[Int, Field(gt=0)]] = Field(default_factory=lambda: [10, 100], min_length=1)
    draws: Int = Field(5, ge=1)
    probe_steps: Int = Field(300, gt=0)  # AdamW steps of the head, batch min(256, n)


class FinetuneConfig(StrictModel):
    """End-to-end fine-tuning: layer-wise lr decay, drop path, label smoothing (MAE, docs/strategies.md §9.2)."""

    enabled: bool = False
    epochs: Int = Field(3, gt=0)
    batch_size: Int = Field(256, gt=0)
    base_lr: Float = Field(1e-3, gt=0)  # per 256 images
    layer_decay: Float = Field(0.75, gt=0, le=1)
    drop_path: Float = Field(0.1, ge=0, lt=1)
    label_smoothing: Float = Field(0.1, ge=0, lt=1)
    weight_decay: Float = Field(0.05, ge=0)
    warmup_epochs: Float = Field(0.5, ge=0)
    train_subset: Int | None = Field(None, gt=0)
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig(scale=(0.5, 1.0)))


class EvalConfig(StrictModel):
    pool: Literal["mean", "cls"] = "mean"
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    low_shot: LowShotConfig | None = Field(default_factory=LowShotConfig)  # null: no low-label protocols
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    every: Int | None = Field(None, gt=0)  # also evaluate after every k-th epoch (convergence curves)
    every_protocols: list[Literal["probe", "knn", "low_shot"]] = Field(default_factory=lambda: ["knn"], min_length=1)
    random_init: bool = True  # also evaluate an untrained encoder: the floor every strategy must beat


class LauncherConfig(StrictModel):
    """Where runs execute. Not part of any run's identity: the same run gives the same numbers anywhere."""

    kind: Literal["local", "debug", "slurm"] = "local"
    partition: str | None = None
    nodes: Int = Field(1, ge=1)  # one run spans nodes x tasks_per_node DDP processes
    gpus_per_node: Int = Field(0, ge=0)
    tasks_per_node: Int = Field(1, ge=1)  # >1: DDP with one process per task
    cpus_per_task: Int = Field(2, ge=1)
    mem_gb: Float = Field(8, gt=0)
    timeout_min: Int = Field(60, gt=0)
    array_parallelism: Int = Field(16, ge=1)
    max_array_size: Int = Field(500, ge=1)
    additional_parameters: Plain = Field(default_factory=dict)  # extra sbatch options
    folder: PathText | None = None  # submitit logs; default <results>/submitit/<suite>


class LoggingConfig(StrictModel):
    """Experiment loggers fed from every metrics row (masking_bench/tracking.py); metrics.jsonl stays the
    record. Not part of any run's identity: logging never changes a number."""

    tensorboard: bool = False  # event files in <run>/tb/
    wandb: bool = False  # Weights & Biases, offline, in <run>/wandb/ (pip install wandb)
