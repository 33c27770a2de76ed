"""The command line: ``run``, ``report``, ``list``. Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import BenchError

DEFAULT_RESULTS = Path("results")


def _cmd_run(args) -> int:
    from .config import expand, load_suite
    from .launch import run_local
    from .masking import get_strategy_class, load_plugin

    suite = load_suite(args.suite)
    for plugin in list(args.plugin) + suite.plugins:
        load_plugin(plugin)
    suite.plugins = sorted(set(suite.plugins) | {str(Path(p).resolve()) for p in args.plugin})
    for ref in suite.strategies:  # fail fast, before any training, on a bad strategy or parameter
        cls = get_strategy_class(ref.name)
        cls(suite.ratios[0], method=suite.method, **ref.params)
    specs = expand(suite, args.suite)
    # data is checked up front so a missing dataset is one line, not a failure per run
    from .data import load_dataset

    load_dataset(suite.data.name, suite.data.root, suite.data.image_size)
    print(f"suite '{suite.name}': {len(specs)} runs -> {args.results / 'runs' / suite.name}", file=sys.stderr)
    outcome = run_local(specs, args.results, show_progress=not args.no_progress)
    print(f"done {len(outcome.done)}, already finished {len(outcome.skipped)}, failed {len(outcome.failed)} "
          f"in {outcome.seconds:.1f} s", file=sys.stderr)
    for run, reason in outcome.failed:
        print(f"failed: {run}: {reason}", file=sys.stderr)
    if not outcome.failed:
        from .report import write_report

        path = write_report(args.results, suite=None)
        print(f"leaderboard: {path}", file=sys.stderr)
    return 1 if outcome.failed else 0


def _cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.results, suite=args.suite, out_dir=args.out)
    print(path.read_text(), end="")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_list(args) -> int:
    from .masking import available, load_plugin

    for plugin in args.plugin:
        load_plugin(plugin)
    for name, cls in available().items():
        tag = " [INTERP]" if cls.interpretation else ""
        params = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items()) or "-"
        print(f"{name:16s} {cls.source}{tag}\n{'':16s} params: {params}")
    suites = sorted(Path("suites").glob("*.yaml"))
    if suites:
        print("suites: " + ", ".join(str(p) for p in suites))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m masking_bench",
                                     description="Benchmark masking strategies for MIM pre-training of ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (skips finished runs, resumes partial ones)")
    run.add_argument("suite", type=Path, help="suite YAML, e.g. suites/smoke.yaml")
    run.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results)")
    run.add_argument("--plugin", action="append", default=[], metavar="FILE", help="strategy file to load")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="regenerate the leaderboard from run records")
    rep.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    rep.add_argument("--suite", default=None, help="only this suite's runs")
    rep.add_argument("--out", type=Path, default=None, help="write here instead of the results folder")
    rep.set_defaults(func=_cmd_report)

    lst = sub.add_parser("list", help="list strategies and suites")
    lst.add_argument("--plugin", action="append", default=[], metavar="FILE")
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs and epochs are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
