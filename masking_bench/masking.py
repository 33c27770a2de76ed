"""The strategy contract: the base class, the mask plan it returns, the registry and plugin discovery.

A strategy is one class with a ``name``, ``defaults`` (its parameters), ``plan`` and a docstring
citing its source. ``plan(images, ctx)`` returns a :class:`MaskPlan`; the trainer hands the plan to
the model and asks the strategy for its losses. The trainer knows nothing else about a strategy.

Discovery, in order: the built-in ``masking_bench.strategies`` package (the top-level
``strategies/`` folder), the entry-point group ``masking_bench.strategies`` of installed packages,
and files given by path (``--plugin FILE`` or the suite field ``plugins``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import BenchError, StrategyError

ENTRY_POINT_GROUP = "masking_bench.strategies"
# a plan's mean realised ratio may differ this much from the requested one (block masking may fall
# short of its target, coarse cells round up) unless the strategy declares ``adaptive_ratio``
RATIO_TOLERANCE = 0.1


# ------------------------------------------------------------------------------------ the plan


@dataclass
class MaskPlan:
    """What a strategy decides for one batch.

    mask: (N, L) bool, True = hidden (predicted), row-major token order. Counts may differ per
        sample (ragged); the MAE encoder then pads with a key-padding attention mask.
    view: the encoder input, when the strategy changes it (default: the batch itself).
    target: the reconstruction target image, when it differs from the view.
    isolate_mask_tokens: visible queries may not attend to mask-token keys (MTO; docs/strategies.md §1.6).
    record_attention: blocks (those holding mask tokens) whose attention the model must return.
    diagnostics: per-sample tensors for inspection (e.g. ``salience`` (N, L), ``base_ratio``).
    """

    mask: torch.Tensor
    view: torch.Tensor | None = None
    target: torch.Tensor | None = None
    isolate_mask_tokens: bool = False
    record_attention: tuple[int, ...] = ()
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def narrow(self, start: int, length: int) -> MaskPlan:
        """The plan of samples ``start .. start+length`` (one DDP rank's share of a global batch)."""
        n = self.mask.shape[0]

        def cut(v):
            return v.narrow(0, start, length) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v

        return MaskPlan(
            mask=cut(self.mask),
            view=cut(self.view),
            target=cut(self.target),
            isolate_mask_tokens=self.isolate_mask_tokens,
            record_attention=self.record_attention,
            diagnostics={k: cut(v) for k, v in self.diagnostics.items()},
        )

    def realised_ratio(self) -> torch.Tensor:
        """Per-sample fraction of hidden tokens, (N,)."""
        return self.mask.float().mean(dim=1)

    def check(self, strategy: MaskingStrategy, batch: int, num_tokens: int) -> None:
        """Raise :class:`StrategyError` naming the strategy and the rule when this plan breaks the contract:
        a bool (N, L) mask; at least one hidden and one visible token per sample; a mean realised ratio
        within ``RATIO_TOLERANCE`` of the requested one (unless the strategy's ratio is adaptive)."""
        who = f"strategy '{strategy.name}' (ratio {strategy.ratio:g})"
        mask = self.mask
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise StrategyError(f"{who}: plan().mask must be a torch.bool tensor (True = hidden), got {kind}")
        if tuple(mask.shape) != (batch, num_tokens):
            raise StrategyError(
                f"{who}: plan().mask must have shape (batch, tokens) = ({batch}, {num_tokens}), got {tuple(mask.shape)}"
            )
        hidden = mask.sum(dim=1)
        low, high = int(hidden.min()), int(hidden.max())
        if low < 1 or high > num_tokens - 1:
            what = "hides no token" if low < 1 else "hides every token"
            raise StrategyError(
                f"{who}: a sample's mask {what}; every sample needs at least one hidden and one "
                f"visible token (hidden per sample: {low}..{high} of {num_tokens})"
            )
        if not strategy.adaptive_ratio:
            realised = float(hidden.float().mean()) / num_tokens
            if abs(realised - strategy.ratio) > RATIO_TOLERANCE:
                raise StrategyError(
                    f"{who}: plan hides {realised:.3f} of the tokens on average, more than "
                    f"{RATIO_TOLERANCE} from the requested ratio; return masks near the ratio, or "
                    "set the class attribute adaptive_ratio = True if the strategy chooses it"
                )


class PlanContext:
    """What a strategy may read while planning: grid, seeded generator, progress, lazy model probes."""

    def __init__(
        self,
        model,
        grid: tuple[int, int],
        generator: torch.Generator,
        epoch: int = 0,
        step: int = 0,
        total_epochs: int = 1,
        method: str = "mae",
    ):
        self.model = model
        self.grid = grid
        self.num_tokens = grid[0] * grid[1]
        self.generator = generator
        self.epoch = epoch
        self.step = step
        self.total_epochs = total_epochs
        self.method = method

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) noise from the run's generator, on the run's device."""
        return torch.rand(*shape, generator=self.generator, device=self.device)

    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings of the current model, (N, L, D), float32, no gradient, no autocast."""
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            return self.model.embed(images.float()).float()

    def attention(self, images: torch.Tensor, block: int = 0) -> torch.Tensor:
        """Real attention probabilities (N, heads, 1+L, 1+L) of an encoder block on all tokens, cls
        first; float32, no gradient, no autocast. Costs the blocks up to ``block``."""
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            return self.model.block_attention(images.float(), block).float()


# --------------------------------------------------------------------------------- base class


class MaskingStrategy:
    """Base class of every masking strategy. Subclass, set ``name`` and ``defaults``, write ``plan``.

    Class attributes a subclass may set:
      name: registry name.
      defaults: parameter name -> default value (parameters given in a suite must be listed here).
      methods: MIM methods the strategy supports (``mae`` drops hidden tokens, ``simmim`` replaces them).
      needs: what the trainer must provide (``embeddings``, ``attention``) — recorded for cost reports.
      interpretation: True when the implementation is our reading of an unreadable paper ([INTERP]).
      adaptive_ratio: True when the strategy chooses the realised ratio itself (the trainer then does
        not hold plans to the requested ratio).
      source: the paper section / reference code the strategy implements.
      summary: one line on what the strategy hides (``list`` shows it; default: the docstring's first line).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    methods: ClassVar[tuple[str, ...]] = ("mae", "simmim")
    needs: ClassVar[frozenset[str]] = frozenset()
    interpretation: ClassVar[bool] = False
    adaptive_ratio: ClassVar[bool] = False
    source: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    @classmethod
    def one_line(cls) -> str:
        """The strategy's one-line description."""
        return cls.summary or ((cls.__doc__ or "").strip().splitlines() or [""])[0]

    def __init__(self, ratio: float, method: str = "mae", **params: Any):
        if not 0.0 <= float(ratio) < 1.0:
            raise BenchError(f"strategy '{self.name}': masking ratio {ratio} must be in [0, 1)")
        if method not in self.methods:
            raise BenchError(
                f"strategy '{self.name}' does not support method '{method}': accepted are {', '.join(self.methods)}"
            )
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise BenchError(f"strategy '{self.name}' has no parameter '{unknown[0]}': accepted are {accepted}")
        self.ratio = float(ratio)
        self.method = method
        self.params = {**self.defaults, **params}
        for key, value in self.params.items():
            setattr(self, key, value)

    def plan(self, images: torch.Tensor, ctx: PlanContext) -> MaskPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def losses(self, model, out, plan: MaskPlan, view: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms summed by the trainer; the default is the method's reconstruction loss."""
        target = plan.target if plan.target is not None else view
        return {"recon": model.reconstruction_loss(out.pred, target, plan.mask)}

    def describe(self) -> dict[str, Any]:
        """What a run record stores about the strategy."""
        return {
            "name": self.name,
            "params": dict(self.params),
            "interpretation": self.interpretation,
            "needs": sorted(self.needs),
            "source": self.source,
        }


# ------------------------------------------------------------------------------ shared helpers


def param_error(strategy: str, key: str, value: Any, accepted: str) -> BenchError:
    """The one-line error for a strategy parameter outside what the strategy accepts."""
    return BenchError(f"strategy '{strategy}': parameter {key}={value!r} is not accepted: {accepted}")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (YAML ``true`` must not pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def num_hidden(num_tokens: int, ratio: float) -> int:
    """MAE's count: keep ``int(L * (1 - r))`` tokens (Python truncation), hide the rest (docs/strategies.md §1.2)."""
    return num_tokens - int(num_tokens * (1 - ratio))


def hide_lowest_first(scores: torch.Tensor, hidden: int | torch.Tensor) -> torch.Tensor:
    """Keep the ``L - hidden`` lowest-scoring tokens of each row, hide the others -> (N, L) bool.

    ``hidden`` may be an int or an (N,) tensor (ragged counts). This is MAE's argsort rule: with
    uniform noise as ``scores`` it is exactly ``random_masking``.
    """
    length = scores.shape[1]
    ranks = torch.argsort(torch.argsort(scores, dim=1), dim=1)  # = MAE's ids_restore
    keep = length - torch.as_tensor(hidden, device=scores.device)
    return ranks >= (keep.view(-1, 1) if keep.ndim else keep)


# ------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, type[MaskingStrategy]] = {}
_ORIGIN: dict[str, str] = {}
_discovered = False


def register(cls: type[MaskingStrategy]) -> type[MaskingStrategy]:
    """Class decorator: add a strategy to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, MaskingStrategy)) or not cls.name:
        raise BenchError(f"{cls!r} must subclass MaskingStrategy and set a non-empty 'name'")
    origin = f"{cls.__module__}.{cls.__qualname__}"
    if cls.name in _REGISTRY and _ORIGIN[cls.name] != origin:
        raise BenchError(f"strategy name '{cls.name}' is taken by {_ORIGIN[cls.name]}; rename {origin}")
    _REGISTRY[cls.name] = cls
    _ORIGIN[cls.name] = origin
    from .fingerprint import strategy_digest

    strategy_digest(cls)  # read its source now, while it is the code this process runs
    return cls


def _discover_builtin_and_installed() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import masking_bench.strategies as builtin

    for info in pkgutil.iter_modules(builtin.__path__):
        importlib.import_module(f"{builtin.__name__}.{info.name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party package must not break the others: name it, go on
            first = (str(exc).strip().splitlines() or [""])[0]
            print(
                f"warning: strategy entry point '{ep.name}' ({ep.value}) failed to load and is skipped: "
                f"{type(exc).__name__}: {first}",
                file=sys.stderr,
            )
            continue
        if isinstance(obj, type) and issubclass(obj, MaskingStrategy) and obj.name not in _REGISTRY:
            register(obj)


def load_plugin(path: str | Path) -> list[str]:
    """Import a strategy file by path; return the names it registered."""
    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".py":
        raise BenchError(f"plugin '{path}' is not a Python file (expected path/to/strategy.py)")
    _discover_builtin_and_installed()
    before = set(_REGISTRY)
    mod_name = f"masking_bench_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except BenchError:
            raise
        except Exception as exc:
            del sys.modules[mod_name]
            raise BenchError(f"plugin '{path}' failed to import: {type(exc).__name__}: {exc}") from exc
        # classes defined in the file but not decorated are registered too
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, MaskingStrategy)
                and obj.name
                and obj.__module__ == mod_name
                and obj.name not in _REGISTRY
            ):
                register(obj)
    added = sorted(set(_REGISTRY) - before)
    return added


def available() -> dict[str, type[MaskingStrategy]]:
    """Every strategy known right now, by name."""
    _discover_builtin_and_installed()
    return dict(sorted(_REGISTRY.items()))


def get_strategy_class(name: str) -> type[MaskingStrategy]:
    strategies = available()
    if name not in strategies:
        raise BenchError(
            f"unknown strategy '{name}': accepted are {', '.join(strategies)} "
            "(or add one with --plugin FILE / the suite field 'plugins')"
        )
    return strategies[name]


def build_strategy(name: str, ratio: float, method: str = "mae", params: dict | None = None) -> MaskingStrategy:
    """Instantiate a registered strategy with validated parameters."""
    return get_strategy_class(name)(ratio, method=method, **(params or {}))
