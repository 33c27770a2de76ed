"""The command line: ``run``, ``status``, ``certify``, ``report``, ``masks``, ``list``, ``bench``.

Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import BenchError

DEFAULT_RESULTS = Path("results")


def _check_data(suite, launcher: str) -> None:
    """A missing dataset is one line up front, not a failure per run."""
    if launcher != "local" and suite.data.name == "imagefolder":
        # on a login node only check the layout: decoding ImageNet here would take minutes and GBs
        root = Path(suite.data.root or "")
        if not suite.data.root or not (root / "train").is_dir():
            raise BenchError(
                f"ImageFolder dataset not found at '{root}': dataset.root must hold train/<class>/ "
                "and val/<class>/ folders of images (checked from this host)"
            )
        return
    from .data import load_dataset

    load_dataset(suite.data.name, suite.data.root, suite.data.image_size)


def _cmd_run(args) -> int:
    from .config import expand, load_suite
    from .launch import launch_suite
    from .masking import get_strategy_class, load_plugin

    suite = load_suite(args.suite)
    for plugin in list(args.plugin) + suite.plugins:
        load_plugin(plugin)
    suite.plugins = sorted(set(suite.plugins) | {str(Path(p).resolve()) for p in args.plugin})
    launcher = args.launcher or suite.launcher.kind  # the flag wins over the suite's launcher block
    for ref in suite.strategies:  # fail fast, before any training, on a bad strategy or parameter
        cls = get_strategy_class(ref.name)
        cls(suite.ratios[0], method=suite.method, **ref.params)
    specs = expand(suite, args.suite, launcher=launcher)
    _warn_legacy(args.results, suite.name)
    _check_data(suite, launcher)
    print(
        f"suite '{suite.name}': {len(specs)} runs -> {args.results / 'runs' / suite.name} (launcher: {launcher})",
        file=sys.stderr,
    )
    wait = not args.no_wait
    outcome = launch_suite(
        specs,
        args.results,
        suite.launcher,
        launcher,
        suite.name,
        wait=wait,
        show_progress=not args.no_progress,
        accept_stale=args.accept_stale,
    )
    if outcome.submitted or outcome.queued:
        jobs = sorted({job for _, job in outcome.submitted}, key=lambda j: (len(j), j))
        arrays = sorted({j.split("_")[0] for j in jobs}, key=lambda j: (len(j), j))
        print(
            f"submitted {len(outcome.submitted)} runs as SLURM job(s) {', '.join(arrays) or '-'}"
            + (f"; {len(outcome.queued)} already queued or running" if outcome.queued else "")
            + f"; logs in {outcome.folder}",
            file=sys.stderr,
        )
    if launcher == "slurm" and not wait:
        print(
            f"not waiting: follow with 'python -m masking_bench status {args.suite}"
            + (f" --results {args.results}" if args.results != DEFAULT_RESULTS else "")
            + "'",
            file=sys.stderr,
        )
        return 0
    busy = f", left to another process {len(outcome.busy)}" if outcome.busy else ""
    print(
        f"done {len(outcome.done)}, already finished {len(outcome.skipped)}{busy}, failed {len(outcome.failed)} "
        f"in {outcome.seconds:.1f} s",
        file=sys.stderr,
    )
    for run, reason in outcome.failed:
        print(f"failed: {run}: {reason}", file=sys.stderr)
    if not outcome.failed:
        # this suite's report beside its runs; the committed top-level files are `report`'s job
        out = args.results / "suites" / suite.name
        try:
            path = _write_report(args.results, suite.name, out)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"leaderboard: {path}", file=sys.stderr)
    return 1 if outcome.failed else 0


def _write_report(results: Path, suite: str | None, out: Path | None) -> Path:
    """write_report, with a failed write (full disk, permissions) as one line that says nothing is lost."""
    from .report import write_report

    try:
        return write_report(results, suite=suite, out_dir=out)
    except OSError as exc:
        where = exc.filename or out or results
        raise BenchError(
            f"could not write the report at {where} ({exc.strerror or exc}); every finished run is "
            "kept: free the space and run `python -m masking_bench report` again"
        ) from None


def _warn_legacy(results: Path, suite: str) -> None:
    from .certify import legacy_count

    n = legacy_count(results, suite)
    if n:
        print(
            f"note: {n} record(s) of suite '{suite}' were written by an older schema and are not matched to "
            f"runs; `python -m masking_bench certify SUITE.yaml` converts them",
            file=sys.stderr,
        )


def _cmd_status(args) -> int:
    from .config import expand, load_suite
    from .status import annotate_with_slurm, format_status, run_rows

    suite = load_suite(args.suite)
    _warn_legacy(args.results, suite.name)
    rows = run_rows(expand(suite, args.suite), args.results)
    with_slurm = annotate_with_slurm(rows) if not args.no_slurm else False
    print(format_status(rows, suite.name, args.results / "runs" / suite.name, with_slurm))
    return 0


def _cmd_certify(args) -> int:
    from .certify import certify, format_outcome, parse_cells, upgrade_legacy
    from .config import expand, load_suite

    cells = parse_cells(args.cells)
    suite = load_suite(args.suite)
    for line in upgrade_legacy(args.results, suite.name):
        print(f"converted {line}", file=sys.stderr)
    specs = expand(suite, args.suite)
    groups = certify(
        specs,
        args.results,
        cells,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        show_progress=not args.no_progress,
        labels=args.strategy or None,
    )
    print(format_outcome(groups))
    return 0 if all(g.certified for g in groups) else 1


def _cmd_report(args) -> int:
    path = _write_report(args.results, args.suite, args.out)
    print(path.read_text(), end="")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_list(args) -> int:
    from .masking import available, load_plugin

    for plugin in args.plugin:
        load_plugin(plugin)
    for name, cls in available().items():
        kind = "interpretation" if cls.interpretation else "faithful"
        params = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items()) or "-"
        print(
            f"{name:14s} {kind:14s} {cls.one_line()}\n{'':29s} source: {cls.source or '-'}\n{'':29s} params: {params}"
        )
    suites = sorted(Path("suites").glob("*.yaml"))
    if suites:
        print("suites: " + ", ".join(str(p) for p in suites))
    return 0


def _cmd_masks(args) -> int:
    from .gallery import AFTER_WARMUP, check_request, dump, parse_params, plan_masks, render
    from .masking import load_plugin

    epoch = AFTER_WARMUP if args.epoch is None else args.epoch
    check_request(args.ratio, args.n, args.seed, epoch)  # before plugins, data or models are loaded
    params = parse_params(args.param)
    for plugin in args.plugin:
        load_plugin(plugin)
    masks = plan_masks(
        args.strategy,
        args.ratio,
        seed=args.seed,
        n=args.n,
        params=params,
        checkpoint=args.checkpoint,
        method=args.method,
        preset=args.model,
        epoch=epoch,
    )
    if args.dump:
        print(f"wrote {dump(masks, args.dump)}", file=sys.stderr)
    if args.out or not args.dump:
        out = args.out or Path(f"masks_{args.strategy}.png")
        print(f"wrote {render(masks, out)}", file=sys.stderr)
    ratios = masks["ratio"]
    print(f"{args.strategy}: hidden ratio mean {ratios.mean():.3f} (min {ratios.min():.3f}, max {ratios.max():.3f})")
    return 0


def _cmd_bench(args) -> int:
    import json

    from .bench import run_all
    from .bench_table import format_table, project_suite

    suites = (
        [] if args.no_projection else [p for p in ("suites/smoke.yaml", "suites/ratio_sweep.yaml") if Path(p).is_file()]
    )
    results = run_all(
        args.device,
        quick=args.quick,
        compile=args.compile,
        threads=args.threads,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    for path in suites:
        results.setdefault("suites", {})[path] = project_suite(path, results)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m masking_bench", description="Benchmark masking strategies for MIM pre-training of ViTs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (skips finished runs, resumes partial ones)")
    run.add_argument("suite", type=Path, help="suite YAML, e.g. suites/smoke.yaml")
    run.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results)")
    run.add_argument("--plugin", action="append", default=[], metavar="FILE", help="strategy file to load")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--launcher",
        choices=("local", "debug", "slurm"),
        default=None,
        help="where runs execute (default: the suite's launcher.kind, else local)",
    )
    run.add_argument(
        "--no-wait", action="store_true", help="slurm: return right after submission (follow with `status`)"
    )
    run.add_argument(
        "--accept-stale",
        action="store_true",
        help="count runs finished by older code as done (the report marks them [STALE])",
    )
    run.set_defaults(func=_cmd_run)

    cer = sub.add_parser(
        "certify",
        help="rerun a few stale runs; if bit-identical, re-stamp the suite's stale records with the current code",
    )
    cer.add_argument("suite", type=Path, help="suite YAML")
    cer.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results)")
    cer.add_argument("--cells", default="1", help="reruns per (strategy, changed code) group, or 'all' (default 1)")
    cer.add_argument(
        "--strategy",
        action="append",
        default=[],
        metavar="LABEL",
        help="only this strategy label's records (repeatable; random_init for the untrained floor)",
    )
    cer.add_argument("--no-progress", action="store_true", help="no progress bars")
    cer.set_defaults(func=_cmd_certify)

    sta = sub.add_parser("status", help="each run's state (pending, running, done, failed + reason, SLURM job)")
    sta.add_argument("suite", type=Path, help="suite YAML")
    sta.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results)")
    sta.add_argument("--no-slurm", action="store_true", help="do not ask sacct about the runs' jobs")
    sta.set_defaults(func=_cmd_status)

    rep = sub.add_parser("report", help="regenerate the leaderboard from run records")
    rep.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    rep.add_argument("--suite", default=None, help="only this suite's runs")
    rep.add_argument("--out", type=Path, default=None, help="write here instead of the results folder")
    rep.set_defaults(func=_cmd_report)

    msk = sub.add_parser("masks", help="render / dump a strategy's masks on Fashion-MNIST test images")
    msk.add_argument("strategy")
    msk.add_argument("--ratio", type=float, default=0.75, help="masking ratio in (0, 1) (default 0.75)")
    msk.add_argument("--seed", type=int, default=0, help="seed of the masks and of a fresh model (default 0)")
    msk.add_argument("--n", type=int, default=8, help="the first N test images, N in 1..64 (default 8)")
    msk.add_argument("--checkpoint", default=None, help="a run's checkpoint.pt (else a seeded fresh model)")
    msk.add_argument("--method", choices=("mae", "simmim"), default="mae")
    msk.add_argument("--model", default="cpu-tiny", help="model preset when no checkpoint is given")
    msk.add_argument("--epoch", type=int, default=None, help="planning epoch >= 0 (default: after any warm-up)")
    msk.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="strategy parameter")
    msk.add_argument("--plugin", action="append", default=[], metavar="FILE")
    msk.add_argument("--out", type=Path, default=None, help="PNG gallery path")
    msk.add_argument("--dump", type=Path, default=None, help=".npz path")
    msk.set_defaults(func=_cmd_masks)

    lst = sub.add_parser("list", help="list strategies and suites")
    lst.add_argument("--plugin", action="append", default=[], metavar="FILE")
    lst.set_defaults(func=_cmd_list)

    ben = sub.add_parser("bench", help="speed figures of this machine (training step, FLOP/s, planning, data, eval)")
    ben.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    ben.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ben.add_argument("--quick", action="store_true", help="fewer rounds (noisier, about half the time)")
    ben.add_argument("--compile", action="store_true", help="also measure torch.compile variants (slow to compile)")
    ben.add_argument("--no-projection", action="store_true", help="do not project the shipped suites' wall time")
    ben.add_argument("--json", type=Path, default=None, help="also write every measured figure to this JSON file")
    ben.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs and epochs are kept; run the same command again to resume", file=sys.stderr)
        return 130
