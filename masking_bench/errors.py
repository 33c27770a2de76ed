"""The errors users see: :class:`BenchError` and its kinds, each a one-line message naming what is wrong
and what is accepted."""


class BenchError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits with status 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class DataMissingError(BenchError):
    """The dataset files are not where the configuration says."""


class NonFiniteLossError(BenchError):
    """Training produced a NaN or infinite loss."""


class RunBusyError(BenchError):
    """Another process holds the run's lock (a second worker, or a cluster job) and is training it."""


class StrategyError(BenchError):
    """A strategy raised, or returned a plan that breaks the contract (``masking_bench.masking``)."""
