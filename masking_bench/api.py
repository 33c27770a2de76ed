"""The Python API: load and run suites, read their records, plan masks, load pre-trained encoders.

    import masking_bench as mb

    suite = mb.load_suite("suites/smoke.yaml", overrides=["train.epochs=1"])
    df = mb.run(suite, results="/tmp/results")          # one row per finished run, one column per metric
    strategy = mb.build_strategy("block", 0.75)
    images, labels = mb.load_images("fashion_mnist", n=8)
    mask, plan = mb.plan_masks(strategy, images)        # (8, 49) bool, True = hidden
    encoder = mb.load_encoder("/tmp/results/runs/smoke/<hash>")
    features = encoder(images)                          # (8, D), pooled as the run's evaluation pools

The same code paths as the command line (README "What you do with it"): suites are validated and
hashed by :mod:`masking_bench.config` (overrides by :mod:`masking_bench.overrides`), runs launched by
:mod:`masking_bench.launch`, records read by :mod:`masking_bench.report.records`. User errors raise
:class:`~masking_bench.errors.BenchError` with a one-line message.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import _API
from .config import DataConfig, RunSpec, Suite
from .errors import BenchError
from .masking import MaskingStrategy, MaskPlan, load_plugin

__all__ = list(_API)  # the names the package re-exports on first use (masking_bench/__init__.py)

AFTER_WARMUP = 10**9  # default planning epoch: past any strategy's warm-up (as the `masks` command)
_ID_COLUMNS = ["suite", "kind", "strategy", "strategy_name", "ratio", "seed", "run_hash", "variant"]
_SETTING_COLUMNS = ["method", "model", "epochs"]
_INTERNAL_COLUMNS = {"floor_key"}


# ------------------------------------------------------------------------------------ suites


def load_suite(
    path_or_dict: str | Path | Mapping[str, Any] | Suite,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    plugins: Iterable[str | Path] = (),
) -> Suite:
    """A validated suite from a YAML file, a mapping (the file's content) or a Suite, with overrides.

    ``overrides``: ``["train.epochs=2", "ratios=[0.6,0.9]"]`` (values parsed as YAML) or
    ``{"train.epochs": 2}`` (values as given); each replaces one field before validation, exactly as
    ``--set`` does. ``plugins``: strategy files loaded (with those the suite names) and recorded in
    the suite. Every strategy, grid axis and model preset is checked here, before anything runs.
    """
    from .config import expand, parse_suite
    from .config import load_suite as load_file
    from .overrides import parse_overrides

    sets = parse_overrides(overrides, prefix="override")
    if isinstance(path_or_dict, Suite):
        suite = parse_suite(path_or_dict.model_dump(mode="python"), f"suite '{path_or_dict.name}'", overrides=sets)
    elif isinstance(path_or_dict, Mapping):
        suite = parse_suite(copy.deepcopy(dict(path_or_dict)), "suite", base_dir=Path.cwd(), overrides=sets)
    elif isinstance(path_or_dict, (str, Path)):
        suite = load_file(path_or_dict, overrides=sets)
    else:
        raise BenchError(f"load_suite: give a suite file path or a mapping, not a {type(path_or_dict).__name__}")
    extra = [str(Path(p).resolve()) for p in plugins]
    for plugin in extra + suite.plugins:
        load_plugin(plugin)
    suite.plugins = sorted(set(suite.plugins) | set(extra))
    for ref in suite.strategies:  # a bad strategy or parameter fails now, not in the first run
        build_strategy(ref.name, suite.ratios[0], method=suite.method, **ref.params)
    expand(suite, f"suite '{suite.name}'")  # grid axes and model preset
    return suite


def run(
    suite: Suite | str | Path | Mapping[str, Any],
    results: str | Path = "results",
    launcher: str = "local",
    progress: bool = True,
    accept_stale: bool = False,
) -> Any:
    """Run every run of ``suite`` not already done (finished runs are skipped, partial ones resumed)
    and return its records: a pandas DataFrame, one row per run of this suite (see :func:`records`).

    Raises :class:`BenchError` naming the first failure when a run fails; the finished ones are kept
    (:func:`records` reads them) and the next call retries the others.
    """
    from .config import expand
    from .launch import launch_suite

    suite = load_suite(suite) if not isinstance(suite, Suite) else suite
    for plugin in suite.plugins:
        load_plugin(plugin)
    specs = expand(suite, f"suite '{suite.name}'", launcher=launcher)
    outcome = launch_suite(
        specs,
        Path(results),
        suite.launcher,
        launcher,
        suite.name,
        wait=True,
        show_progress=progress,
        accept_stale=accept_stale,
    )
    if outcome.failed:
        first, reason = outcome.failed[0]
        raise BenchError(
            f"{len(outcome.failed)} of {len(specs)} runs of suite '{suite.name}' failed (first: {first}: {reason}); "
            "finished runs are kept (records() reads them) and the next run() retries the others"
        )
    frame = records(results, suite=suite.name)
    order = {spec.run_hash: i for i, spec in enumerate(specs)}
    frame = frame[frame["run_hash"].isin(order)]
    return frame.sort_values("run_hash", key=lambda s: s.map(order)).reset_index(drop=True)


def records(results: str | Path = "results", suite: str | None = None) -> Any:
    """Every finished run under ``results`` (live and archived records), optionally of one suite.

    A pandas DataFrame, one row per run: suite, kind (pretrain / random_init), strategy (label),
    strategy_name, ratio, seed, run_hash, variant (grid values), method, model, epochs, then one
    ``<protocol>_top1`` column per evaluation protocol (probe, knn, ...), then the cost columns
    (epoch_seconds, train_img_per_s, peak_mem_mb, gflops_per_image, ...; docs/report_columns.md).
    Raises :class:`BenchError` when there is no finished run.
    """
    from .report.records import collect, protocol_sort_key

    runs = collect(Path(results), suite).runs
    metrics = sorted((c for c in runs.columns if c.endswith("_top1")), key=lambda c: protocol_sort_key(c[:-5]))
    first = _ID_COLUMNS + _SETTING_COLUMNS + metrics
    rest = [c for c in runs.columns if c not in first and c not in _INTERNAL_COLUMNS]
    runs = runs[[c for c in first if c in runs.columns] + rest]
    return runs.sort_values(["suite", "kind", "strategy", "ratio", "seed", "run_hash"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------ masks


def build_strategy(name: str, ratio: float, method: str = "mae", **params: Any) -> MaskingStrategy:
    """A registered strategy (built-in, installed, or loaded with :func:`load_plugin`) with its parameters
    checked: ``build_strategy("block", 0.75, min_block=4)``."""
    from .masking import build_strategy as build

    return build(name, ratio, method, params)


def load_images(
    data: str | Suite | DataConfig | Encoder = "fashion_mnist",
    n: int = 8,
    split: str = "test",
    root: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of a dataset split, normalised as training normalises them, and their labels.

    ``data``: a dataset name (``fashion_mnist``, ``cifar10``, ``synthetic``, ``imagefolder``), a
    suite or its ``data`` block, or an encoder from :func:`load_encoder` (the data it was trained on).
    """
    from .data import load_dataset

    if isinstance(data, Encoder):
        data = data.spec.data
    if isinstance(data, Suite):
        data = data.data
    cfg = data if isinstance(data, DataConfig) else DataConfig(name=data)
    if split not in ("train", "test"):
        raise BenchError(f"load_images: split '{split}' is not one of train, test")
    dataset = load_dataset(cfg.name, root or cfg.root, cfg.image_size)
    part = getattr(dataset, split)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(part):
        raise BenchError(f"load_images: n={n} is out of range: give 1..{len(part)} ({cfg.name} {split} split)")
    c = dataset.channels
    mean = torch.tensor(dataset.mean).view(1, c, 1, 1)
    std = torch.tensor(dataset.std).view(1, c, 1, 1)
    return (part.images[:n].float() / 255.0 - mean) / std, part.labels[:n].clone()


def _planning_model(model: Any, method: str, images: torch.Tensor, seed: int):
    from .models import build_model

    if model is None:  # a seeded fresh model sized for the images (what `masks` uses without a checkpoint)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model("cpu-tiny", method, images.shape[-1], images.shape[1]).to(images.device)
    if isinstance(model, (str, Path)):
        return load_encoder(model).model
    if isinstance(model, Encoder):
        return model.model
    if not hasattr(model, "grid") or not hasattr(model, "embed"):
        raise BenchError(
            f"plan_masks: model must be a run folder, an encoder from load_encoder() or a masking_bench "
            f"MIMViT, not a {type(model).__name__}"
        )
    return model


def plan_masks(
    strategy: MaskingStrategy,
    images: torch.Tensor,
    model: Any = None,
    seed: int = 0,
    epoch: int = AFTER_WARMUP,
    total_epochs: int = 1,
) -> tuple[torch.Tensor, MaskPlan]:
    """Plan ``strategy``'s masks for a batch: ``(mask, plan)``, mask (B, L) bool with True = hidden.

    ``images``: (B, C, H, W) float, normalised as in training (:func:`load_images`). ``model``: what
    a salience strategy reads — None (a fresh cpu-tiny model seeded ``seed``), a run folder, an
    :class:`Encoder` or a MIMViT. ``epoch`` defaults to past any warm-up. The plan is checked
    against the strategy contract as in training (docs/strategies.md).
    """
    from .masking import PlanContext
    from .step import _call_strategy

    if not isinstance(strategy, MaskingStrategy):
        raise BenchError(
            f"plan_masks: give a strategy from build_strategy(name, ratio), not a {type(strategy).__name__}"
        )
    x = torch.as_tensor(images)
    x = x[:, None] if x.ndim == 3 else x
    if x.ndim != 4 or not x.is_floating_point():
        raise BenchError(
            f"plan_masks: images must be a float (B, C, H, W) batch normalised as in training "
            f"(load_images gives one), got {tuple(x.shape)} {x.dtype}"
        )
    net = _planning_model(model, strategy.method, x, seed)
    side = net.grid[0] * net.patch_size
    if net.method != strategy.method:
        raise BenchError(f"plan_masks: the strategy is built for {strategy.method}, the model is a {net.method} model")
    if x.shape[1] != net.in_chans or tuple(x.shape[-2:]) != (side, side):
        raise BenchError(
            f"plan_masks: images of {x.shape[1]}x{x.shape[-2]}x{x.shape[-1]} do not fit the model "
            f"({net.in_chans}x{side}x{side})"
        )
    generator = torch.Generator(device=x.device).manual_seed(seed)
    ctx = PlanContext(net, net.grid, generator, epoch=epoch, total_epochs=total_epochs, method=net.method)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            plan = _call_strategy(strategy, "plan", strategy.plan, x, ctx)
    finally:
        net.train(was_training)
    if not isinstance(plan, MaskPlan):
        raise BenchError(f"strategy '{strategy.name}': plan() must return a MaskPlan, got {type(plan).__name__}")
    plan.check(strategy, x.shape[0], ctx.num_tokens)
    return plan.mask, plan


# ---------------------------------------------------------------------------------- encoders


class Encoder(torch.nn.Module):
    """A run's pre-trained ViT in eval mode: ``encoder(images)`` -> (B, D) features, pooled as the
    run's evaluation pools them (``eval.pool``). ``model`` is the whole MIMViT (decoder included),
    ``spec`` the run, ``mean``/``std`` the normalisation of its training data, ``epochs_done`` the
    pre-training epochs in the weights."""

    def __init__(self, model, spec: RunSpec, mean, std, epochs_done: int):
        super().__init__()
        self.model = model
        self.spec = spec
        self.pool = spec.eval.pool
        self.mean, self.std = tuple(mean), tuple(std)
        self.epochs_done = epochs_done

    @property
    def grid(self) -> tuple[int, int]:
        return self.model.grid

    @property
    def method(self) -> str:
        return self.model.method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images, self.pool)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (0..255) or float (0..1) images -> the model's input, normalised as in training."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        c = x.shape[1]
        mean = torch.tensor(self.mean, device=x.device).view(1, c, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, c, 1, 1)
        return (x - mean) / std


def _read_spec(folder: Path) -> RunSpec:
    import yaml
    from pydantic import ValidationError

    from .config import spec_from_dict

    cfg = folder / "config.yaml"
    if not cfg.is_file():
        raise BenchError(f"'{folder}' is not a run folder: no config.yaml (runs live in results/runs/<suite>/<hash>/)")
    try:
        data = yaml.safe_load(cfg.read_text())
        data.pop("run_hash", None)
        return spec_from_dict(data)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, ValidationError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise BenchError(f"'{cfg}' is not a run config ({type(exc).__name__}: {first[:120]})") from None


def load_encoder(run_dir: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """The encoder of a run folder (``results/runs/<suite>/<hash>``, or its ``checkpoint.pt``), in eval mode.

    The model is rebuilt from the run's ``config.yaml`` as training builds it (train.make_model; the
    dataset is loaded for its shape and normalisation) and the weights come from ``checkpoint.pt``
    (the last finished epoch). An untrained run (``random_init``, ``epochs: 0``) needs no checkpoint:
    its seeded initial weights are rebuilt. Archived records (``results/records``) keep no weights.
    """
    from .train import get_dataset, make_model

    path = Path(run_dir)
    folder = path.parent if path.is_file() else path
    spec = _read_spec(folder)
    dataset = get_dataset(spec)
    with torch.random.fork_rng(devices=[]):  # make_model seeds torch; leave the caller's generator alone
        model = make_model(spec, dataset)
    epochs_done = 0
    if spec.kind == "pretrain" and spec.train.epochs > 0:
        ckpt = path if path.is_file() else folder / "checkpoint.pt"
        if not ckpt.is_file():
            raise BenchError(
                f"run folder '{folder}' has no checkpoint.pt: not trained yet, or an archived record "
                "(results/records keeps no weights); `run` its suite to train it"
            )
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
        except Exception as exc:  # truncated, another program's file, another model's weights
            raise BenchError(
                f"checkpoint '{ckpt}' cannot be loaded into the run's {spec.model.preset} {spec.method} model "
                f"({type(exc).__name__})"
            ) from None
        epochs_done = int(state.get("epochs_done", 0))
        if epochs_done < spec.train.epochs:
            warnings.warn(
                f"run {spec.run_hash} ({spec.short()}) has finished {epochs_done} of {spec.train.epochs} "
                "epochs: these are the weights of its last finished epoch",
                stacklevel=2,
            )
    return Encoder(model, spec, dataset.mean, dataset.std, epochs_done).to(device).eval()
