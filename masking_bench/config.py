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
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .config_sections import AugmentConfig, EvalConfig, LauncherConfig, LoggingConfig
from .errors import BenchError
from .values import DEVICE, SAFE_NAME, SAFE_NAME_RULE, Float, Int, PathText, Plain, Ratio, Seed, StrictModel, plain_data

# 2: strategy parameters resolved (defaults merged in) and the precision used are part of the identity
SCHEMA_VERSION = 2


_Strict = StrictModel


class StrategyRef(_Strict):
    name: str
    params: Plain = Field(default_factory=dict)
    label: str | None = None  # display name; defaults to ``name``
    # train this strategy at only these of the suite's ratios (default: all of them); shapes the
    # grid, never a run's numbers, so it is not part of any run's identity
    ratios: list[Ratio] | None = Field(None, min_length=1)

    @field_validator("label")
    @classmethod
    def _label_is_a_file_name(cls, value):
        # labels name rows and plot legends, and may name per-strategy files: one safe path component
        if value is not None and (
            not 1 <= len(value) <= 100
            or value[0] in ". "
            or value[-1] == " "
            or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in value)
        ):
            raise ValueError(
                "a strategy label must be 1-100 characters without '/', '\\' or control characters, "
                "not starting with '.' or a space, not ending with a space"
            )
        return value

    @property
    def display(self) -> str:
        return self.label or self.name


class ModelConfig(_Strict):
    preset: str = "cpu-tiny"
    overrides: Plain = Field(default_factory=dict)  # checked against the model's fields in expand()


class DataConfig(_Strict):
    name: Literal["fashion_mnist", "imagefolder", "cifar10", "synthetic"] = "fashion_mnist"
    root: PathText | None = None  # overrides $MASKING_BENCH_DATA_DIR and the built-in default
    train_subset: Int | None = Field(None, gt=0)  # pre-train on a fixed seeded subset
    image_size: Int | None = Field(None, gt=0)
    # memory | prepared (a decoded file read by index: masking_bench/prepared.py) | auto: prepared for
    # imagefolder, memory otherwise. Same bytes either way, so not part of any run's identity
    storage: Literal["auto", "memory", "prepared"] = "auto"


class TrainConfig(_Strict):
    epochs: Int = Field(10, ge=0)
    batch_size: Int = Field(256, gt=0)  # the global (effective) batch of one optimizer step
    # micro-batches per step and process (gradient accumulation); like the process count, it changes
    # only how a step's batch is split, so it is not part of a run's identity (README, "Multi-node")
    accum_steps: Int = Field(1, ge=1)
    base_lr: Float = Field(1.5e-3, gt=0)  # learning rate per 256 images (scaled linearly with batch)
    min_lr: Float = Field(0.0, ge=0)
    warmup_epochs: Float = Field(1.0, ge=0)
    weight_decay: Float = Field(0.05, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.95)
    clip_grad: Float | None = Field(3.0, gt=0)
    # auto: bf16 where the hardware runs it natively, else fp32 (masking_bench/precision.py); the
    # precision actually used is part of the run identity, this field as written is not
    amp: Literal["auto", "none", "bf16"] = "auto"
    norm_pix_loss: bool = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, value):
        if not all(0 <= b < 1 for b in value):
            raise ValueError("AdamW betas must each be in [0, 1)")
        return value


class Suite(_Strict):
    name: str
    description: str = ""
    method: Literal["mae", "simmim"] = "mae"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    strategies: list[StrategyRef] = Field(min_length=1)
    ratios: list[Ratio] = Field(min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # extra axes: dotted field -> values (each a non-empty list of plain values)
    grid: dict[str, Annotated[list[Any], Field(min_length=1), AfterValidator(plain_data)]] = Field(default_factory=dict)
    plugins: list[PathText] = Field(default_factory=list)  # strategy files loaded by path
    device: str = "auto"
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    # copy finished runs to <results>/records/<suite>/ (committed to git); never part of a run's identity
    archive: bool = False
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("logging")
    @classmethod
    def _loggers_installed(cls, value):
        from .tracking import wandb_missing_message

        missing = wandb_missing_message() if value.wandb else None
        if missing:
            raise ValueError(missing)
        return value

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value):
        if not SAFE_NAME.fullmatch(value):
            raise ValueError(f"the suite name names its results folder: use {SAFE_NAME_RULE}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value):
        if not DEVICE.fullmatch(value):
            raise ValueError("accepted devices are auto, cpu, cuda and cuda:<index>")
        return value

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

    @model_validator(mode="after")
    def _unique_labels(self):
        for strat in self.strategies:
            outside = [r for r in strat.ratios or [] if r not in self.ratios]
            if outside:
                raise ValueError(
                    f"strategy '{strat.display}' asks for ratio {outside[0]:g}, which is not in the suite's "
                    f"ratios {[float(r) for r in self.ratios]}: a strategy's ratios are a subset of them"
                )
        labels = [s.display for s in self.strategies]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"strategy label '{sorted(dup)[0]}' appears twice; give one a distinct 'label'")
        world = self.launcher.nodes * self.launcher.tasks_per_node * self.train.accum_steps
        if self.train.batch_size % world:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} must be a multiple of launcher.nodes "
                f"{self.launcher.nodes} x launcher.tasks_per_node {self.launcher.tasks_per_node} x "
                f"train.accum_steps {self.train.accum_steps} (one equal micro-batch per process and step)"
            )
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
    archive: bool = False  # the suite's `archive`: copy the finished run to results/records (not identity)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)  # absent from older records

    def identity(self) -> dict[str, Any]:
        """Every field that changes the numbers; the hash is taken over this."""
        ident = self.model_dump(mode="json", exclude={"suite", "plugins", "device", "logging", "archive"})
        ident["strategy"].pop("label", None)
        ident["strategy"].pop("ratios", None)
        ident["data"].pop("root", None)
        ident["data"].pop("storage", None)
        ident["train"].pop("accum_steps", None)
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


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_validation(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = _shorten(".".join(str(p) for p in first["loc"]) or "(top level)")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    extra = f" ({len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    got = first.get("input")
    hidden = first["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
    shown = "" if hidden else f", got {_shorten(repr(got))}"
    return f"{source}: field '{loc}': {_shorten(msg, 300)}{shown}{extra}"


def load_suite(path: str | Path, overrides=None) -> Suite:
    """Read and validate a suite file; every problem becomes a one-line :class:`BenchError`.

    ``overrides`` (``["train.epochs=2", ...]`` or ``{"train.epochs": 2}``) are set into the file's
    mapping before validation (:mod:`masking_bench.overrides`).

    A suite without a ``name`` is named after its file; a file name that is not a safe folder name
    (e.g. ``my suite.yaml``) is refused with a request to set ``name:``, never silently rewritten.
    """
    from .overrides import parse_overrides

    overrides = parse_overrides(overrides)
    path = Path(path)
    if path.is_dir():
        raise BenchError(f"suite path '{path}' is a folder: give one suite file (suites/*.yaml)")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise BenchError(f"suite file '{path}' {what} (suites live in suites/*.yaml)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchError(f"{path}: cannot read the suite file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BenchError(
            f"{path}: not a UTF-8 text file (undecodable byte at offset {exc.start}); a suite is a YAML text file"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise BenchError(f"{path}: malformed YAML{where}: {_shorten(problem, 200)}") from None
    except RecursionError:
        raise BenchError(f"{path}: malformed YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: a suite must be a YAML mapping with at least 'strategies' and 'ratios'")
    named = "name" in raw or any(o.path == ("name",) for o in overrides)
    if not named and not SAFE_NAME.fullmatch(path.stem):
        hint = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).lstrip("_.-")[:100] or "my_suite"
        raise BenchError(
            f"{path}: the file name '{path.stem}' cannot name the suite's results folder; add a line "
            f"'name: {hint}' to the suite ({SAFE_NAME_RULE})"
        )
    raw.setdefault("name", path.stem)
    return parse_suite(raw, str(path), base_dir=path.parent, overrides=overrides)


def parse_suite(raw: dict, source: str = "suite", base_dir: Path | None = None, overrides=None) -> Suite:
    from .overrides import apply_overrides, blame

    raw, sets = apply_overrides(raw, overrides)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        raise BenchError(_format_validation(err, blame(err, sets, source))) from None
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
    from .precision import cuda_available  # torch.cuda.is_available(), without torch where it is surely no

    return "cuda" if cuda_available() else "cpu"


def resolve_strategy(ref: StrategyRef, plugins: list[str]) -> StrategyRef:
    """``ref`` with the strategy's defaults merged into its parameters (the resolved parameters)."""
    from .catalog import defaults  # the class's defaults, or their cached copy (no torch import)

    return ref.model_copy(update={"params": {**defaults(ref.name, plugins), **ref.params}})


# grid axes refused: the first are axes already; the others are not part of any run's identity
_LISTED_AXES = ("strategies", "ratios", "seeds")
_NON_IDENTITY_AXES = ("name", "description", "device", "plugins", "launcher", "grid", "logging", "archive")


def _check_grid_axes(suite: Suite, source: str) -> None:
    for dotted in suite.grid:
        root = dotted.split(".")[0]
        if dotted in ("data.storage", "train.accum_steps"):
            raise BenchError(
                f"{source}: grid axis '{dotted}' does not change what a run computes (only how it reads data "
                "or splits a batch); set it once in the suite"
            )
        if root in _LISTED_AXES:
            raise BenchError(f"{source}: grid axis '{dotted}' is already an axis; list it in the suite instead")
        if root in _NON_IDENTITY_AXES:
            raise BenchError(
                f"{source}: grid axis '{dotted}' does not change what a run computes; set it once in "
                "the suite (grid axes are fields of method, model, data, train or eval)"
            )


def _check_model(model: ModelConfig, source: str) -> None:
    """The preset exists and every override names a model field (else the run would fail when it starts)."""
    from .catalog import model_schema  # models.PRESETS and MIMViT's parameters, cached (no torch import)

    presets, init_params = model_schema()
    if model.preset not in presets:
        raise BenchError(f"{source}: unknown model preset '{model.preset}': accepted are {', '.join(presets)}")
    set_by_run = {"self", "img_size", "in_chans", "method", "norm_pix_loss"}
    fields = [p for p in init_params if p not in set_by_run]
    unknown = sorted(set(model.overrides) - set(fields))
    if unknown:
        raise BenchError(
            f"{source}: field 'model.overrides': unknown model field '{_shorten(unknown[0])}': "
            f"accepted are {', '.join(fields)}"
        )


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
    _check_grid_axes(suite, source)
    resolved = {s.display: resolve_strategy(s, suite.plugins) for s in suite.strategies}
    for combo in itertools.product(*[values for _, values in axes]) if axes else [()]:
        tree = copy.deepcopy(base)
        for (dotted, _), value in zip(axes, combo, strict=True):
            _set_dotted(tree, dotted, value, source)
        try:
            variant = Suite.model_validate(tree)
        except ValidationError as err:
            raise BenchError(_format_validation(err, source)) from None
        _check_model(variant.model, source)
        common = dict(
            suite=suite.name,
            method=variant.method,
            model=variant.model,
            data=variant.data,
            train=variant.train,
            eval=variant.eval,
            plugins=suite.plugins,
            device=suite.device,
            archive=suite.archive,
            logging=suite.logging,
        )
        used = precision.resolve(variant.train.amp, device_type, hardware)
        candidates = []
        if variant.eval.random_init:
            floor = StrategyRef(name="random_init")
            candidates += [
                RunSpec(kind="random_init", strategy=floor, ratio=None, seed=s, **common) for s in variant.seeds
            ]
        for strat in variant.strategies:
            ref = resolved.get(strat.display) or resolve_strategy(strat, suite.plugins)
            for ratio in strat.ratios or variant.ratios:
                candidates += [
                    RunSpec(strategy=ref, ratio=ratio, seed=s, precision=used, **common) for s in variant.seeds
                ]
        for spec in candidates:
            if spec.run_hash not in seen:
                seen.add(spec.run_hash)
                runs.append(spec)
    return runs


def spec_from_dict(data: dict) -> RunSpec:
    return RunSpec.model_validate(data)
