"""Suite and run schema: validation with one-line errors, expansion of a suite into runs, run hashes.

A suite lists strategies × ratios × seeds (and optionally any other field through ``grid``); each
combination becomes a :class:`RunSpec` whose identity — every field that changes the numbers — is
hashed into a stable 12-hex-digit name. Paths, devices and display labels are not part of it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BenchError

# 2: strategy parameters resolved (defaults merged in) and the precision used are part of the identity
SCHEMA_VERSION = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrategyRef(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None  # display name; defaults to ``name``

    @property
    def display(self) -> str:
        return self.label or self.name


class ModelConfig(_Strict):
    preset: str = "cpu-tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    name: Literal["fashion_mnist", "imagefolder", "cifar10", "synthetic"] = "fashion_mnist"
    root: str | None = None  # overrides $MASKING_BENCH_DATA_DIR and the built-in default
    train_subset: int | None = Field(None, gt=0)  # pre-train on a fixed seeded subset
    image_size: int | None = Field(None, gt=0)


class AugmentConfig(_Strict):
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(256, gt=0)
    base_lr: float = Field(1.5e-3, gt=0)  # learning rate per 256 images (scaled linearly with batch)
    min_lr: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = Field(3.0, gt=0)
    # auto: bf16 where the hardware runs it natively, else fp32 (masking_bench/precision.py); the
    # precision actually used is part of the run identity, this field as written is not
    amp: Literal["auto", "none", "bf16"] = "auto"
    norm_pix_loss: bool = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class ProbeConfig(_Strict):
    # lr 1e-2 / 100 epochs: chosen on a held-out part of the *train* split (10k probe-train images vs
    # 4k others; one trained checkpoint and one untrained encoder), where 1e-3 / 30 epochs underfit by
    # ~7 points. Never on the test split. See README "Evaluation recipe".
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    train_subset: int | None = Field(None, gt=0)
    test_subset: int | None = Field(None, gt=0)


class KnnConfig(_Strict):
    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0)


class LowShotConfig(_Strict):
    """Linear probe and kNN with few labels per class, averaged over fixed label draws (same for every run)."""

    shots: list[int] = Field(default_factory=lambda: [10, 100])
    draws: int = Field(5, ge=1)
    probe_steps: int = Field(300, gt=0)  # AdamW steps of the head, batch min(256, n)


class FinetuneConfig(_Strict):
    """End-to-end fine-tuning: layer-wise lr decay, drop path, label smoothing (MAE protocol, spec §7.1)."""

    enabled: bool = False
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(256, gt=0)
    base_lr: float = Field(1e-3, gt=0)  # per 256 images
    layer_decay: float = Field(0.75, gt=0, le=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(0.5, ge=0)
    train_subset: int | None = Field(None, gt=0)
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig(scale=(0.5, 1.0)))


class EvalConfig(_Strict):
    pool: Literal["mean", "cls"] = "mean"
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    low_shot: LowShotConfig | None = None
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    every: int | None = Field(None, gt=0)  # also evaluate after every k-th epoch (convergence curves)
    every_protocols: list[Literal["probe", "knn", "low_shot"]] = Field(default_factory=lambda: ["knn"])
    random_init: bool = True  # also evaluate an untrained encoder: the floor every strategy must beat


class LauncherConfig(_Strict):
    """Where runs execute. Not part of any run's identity: the same run gives the same numbers anywhere."""

    kind: Literal["local", "debug", "slurm"] = "local"
    partition: str | None = None
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int = Field(1, ge=1)  # >1: DDP with one process per task
    cpus_per_task: int = Field(2, ge=1)
    mem_gb: float = Field(8, gt=0)
    timeout_min: int = Field(60, gt=0)
    array_parallelism: int = Field(16, ge=1)
    max_array_size: int = Field(500, ge=1)
    additional_parameters: dict[str, Any] = Field(default_factory=dict)  # extra sbatch options
    folder: str | None = None  # submitit logs; default <results>/submitit/<suite>


class Suite(_Strict):
    name: str
    description: str = ""
    method: Literal["mae", "simmim"] = "mae"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    strategies: list[StrategyRef] = Field(min_length=1)
    ratios: list[float] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # extra axes: dotted field -> values
    plugins: list[str] = Field(default_factory=list)  # strategy files loaded by path
    device: str = "auto"
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategy_shorthand(cls, value):
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value):
        return {"preset": value} if isinstance(value, str) else value

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, value):
        for r in value:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"masking ratio {r} is outside [0, 1)")
        return value

    @model_validator(mode="after")
    def _unique_labels(self):
        labels = [s.display for s in self.strategies]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"strategy label '{sorted(dup)[0]}' appears twice; give one a distinct 'label'")
        return self


class RunSpec(BaseModel):
    """One pre-training run (or the untrained-encoder floor when ``kind == 'random_init'``)."""

    model_config = ConfigDict(extra="forbid")
    suite: str
    kind: Literal["pretrain", "random_init"] = "pretrain"
    strategy: StrategyRef
    ratio: float | None
    seed: int
    method: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    plugins: list[str] = Field(default_factory=list)
    device: str = "auto"
    precision: Literal["bf16", "fp32"] | None = None  # what train.amp resolved to (pre-training runs)

    def identity(self) -> dict[str, Any]:
        """Every field that changes the numbers; the hash is taken over this."""
        ident = self.model_dump(mode="json", exclude={"suite", "plugins", "device"})
        ident["strategy"].pop("label", None)
        ident["data"].pop("root", None)
        ident["train"].pop("amp")  # as written (auto / bf16 / none); what it resolved to is `precision`
        ident["schema"] = SCHEMA_VERSION
        if self.kind == "random_init":  # nothing of the training recipe reaches an untrained encoder
            for key in ("strategy", "ratio", "train", "precision"):
                ident.pop(key)
        return ident

    @property
    def run_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return "random_init" if self.kind == "random_init" else self.strategy.display

    def short(self) -> str:
        ratio = "" if self.ratio is None else f" r={self.ratio:g}"
        return f"{self.label}{ratio} seed={self.seed}"


# ---------------------------------------------------------------------------------- loading


def _format_validation(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    extra = f" ({len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    got = first.get("input")
    shown = "" if first["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f", got {got!r}"
    return f"{source}: field '{loc}': {msg}{shown}{extra}"


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; every problem becomes a one-line :class:`BenchError`."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"suite file '{path}' does not exist (suites live in suites/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BenchError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: a suite must be a YAML mapping with at least 'strategies' and 'ratios'")
    raw.setdefault("name", path.stem)
    return parse_suite(raw, str(path), base_dir=path.parent)


def parse_suite(raw: dict, source: str = "suite", base_dir: Path | None = None) -> Suite:
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        raise BenchError(_format_validation(err, source)) from None
    if base_dir is not None:  # plugin paths are relative to the suite file
        suite.plugins = [str((base_dir / p).resolve()) if not Path(p).is_absolute() else p for p in suite.plugins]
    return suite


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise BenchError(f"{source}: grid axis '{dotted}' does not name a field of the suite")
        node = node[key]
    node[keys[-1]] = value


def planned_device_type(suite: Suite, launcher: str | None = None) -> str:
    """The device type the suite's runs will train on: ``cpu`` or ``cuda`` (decides ``amp: auto``)."""
    if suite.device != "auto":
        return suite.device.split(":")[0]
    if (launcher or suite.launcher.kind) == "slurm":
        return "cuda" if suite.launcher.gpus_per_node > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_strategy(ref: StrategyRef, plugins: list[str]) -> StrategyRef:
    """``ref`` with the strategy's defaults merged into its parameters (the resolved parameters)."""
    from .masking import get_strategy_class, load_plugin

    for plugin in plugins:
        load_plugin(plugin)
    cls = get_strategy_class(ref.name)
    return ref.model_copy(update={"params": {**copy.deepcopy(cls.defaults), **ref.params}})


def expand(suite: Suite, source: str = "suite", launcher: str | None = None, hardware=None) -> list[RunSpec]:
    """Every run of the suite: (grid axes) × strategies × ratios × seeds, plus the random-init floors.

    Strategy parameters are resolved (defaults merged in) and ``train.amp`` is resolved to the
    precision the runs will use on the planned device (``launcher`` overrides the suite's launcher
    kind; ``hardware`` stands in for this host's, in tests): both are part of each run's identity.
    """
    from . import precision

    device_type = planned_device_type(suite, launcher)
    base = suite.model_dump(mode="python")
    axes = list(suite.grid.items())
    runs: list[RunSpec] = []
    seen: set[str] = set()
    resolved = {s.display: resolve_strategy(s, suite.plugins) for s in suite.strategies}
    for combo in itertools.product(*[values for _, values in axes]) if axes else [()]:
        tree = copy.deepcopy(base)
        for (dotted, _), value in zip(axes, combo):
            if dotted.split(".")[0] in ("strategies", "ratios", "seeds", "grid", "name"):
                raise BenchError(f"{source}: grid axis '{dotted}' is already an axis; list it in the suite instead")
            _set_dotted(tree, dotted, value, source)
        try:
            variant = Suite.model_validate(tree)
        except ValidationError as err:
            raise BenchError(_format_validation(err, source)) from None
        common = dict(suite=suite.name, method=variant.method, model=variant.model, data=variant.data,
                      train=variant.train, eval=variant.eval, plugins=suite.plugins, device=suite.device)
        used = precision.resolve(variant.train.amp, device_type, hardware)
        candidates = []
        if variant.eval.random_init:
            floor = StrategyRef(name="random_init")
            candidates += [RunSpec(kind="random_init", strategy=floor, ratio=None, seed=s, **common)
                           for s in variant.seeds]
        for strat in variant.strategies:
            ref = resolved.get(strat.display) or resolve_strategy(strat, suite.plugins)
            for ratio in variant.ratios:
                candidates += [RunSpec(strategy=ref, ratio=ratio, seed=s, precision=used, **common)
                               for s in variant.seeds]
        for spec in candidates:
            if spec.run_hash not in seen:
                seen.add(spec.run_hash)
                runs.append(spec)
    return runs


def spec_from_dict(data: dict) -> RunSpec:
    return RunSpec.model_validate(data)
