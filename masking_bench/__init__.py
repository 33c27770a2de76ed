"""masking_bench: compare masking strategies for masked-image-modeling pre-training of ViTs, honestly and cheaply.

The Python API (:mod:`masking_bench.api`) is re-exported here on first use, so ``import masking_bench``
stays light (no torch, pandas or pydantic until an API function is touched)::

    import masking_bench as mb
    df = mb.run(mb.load_suite("suites/smoke.yaml", overrides=["train.epochs=1"]), results="/tmp/results")
"""

__version__ = "0.1.0"

_API = (
    "BenchError",
    "Encoder",
    "build_strategy",
    "load_encoder",
    "load_images",
    "load_plugin",
    "load_suite",
    "plan_masks",
    "records",
    "run",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'masking_bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
