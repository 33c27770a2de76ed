"""The command line: ``run``, ``plan``, ``status``, ``certify``, ``report``, ``masks``, ``list``, ``export``,
``prepare``, ``bench``.

Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import BenchError

DEFAULT_RESULTS = Path("results")


def _check_data(suite, launcher: str, results: Path) -> None:
    """A missing dataset is one line up front, not a failure per run; locally, a prepared dataset that is
    missing is made now (jobs on a cluster make it under a lock, or run `prepare` first)."""
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
    from .prepared import cache_root

    d = suite.data
    load_dataset(d.name, d.root, d.image_size, d.storage, cache_root(results))


def _source(args) -> str:
    """The suite file and its overrides, as error messages name them."""
    return str(args.suite) + "".join(f" --set {item}" for item in args.set)


def _prepare(args):
    """(suite with its --set overrides and plugins, launcher, every run of it): what `run` and `plan` act on."""
    from .config import expand, load_suite
    from .masking import get_strategy_class, load_plugin

    suite = load_suite(args.suite, args.set)
    for plugin in list(args.plugin) + suite.plugins:
        load_plugin(plugin)
    suite.plugins = sorted(set(suite.plugins) | {str(Path(p).resolve()) for p in args.plugin})
    launcher = args.launcher or suite.launcher.kind  # the flag wins over the suite's launcher block
    for ref in suite.strategies:  # fail fast, before any training, on a bad strategy or parameter
        cls = get_strategy_class(ref.name)
        cls(suite.ratios[0], method=suite.method, **ref.params)
    return suite, launcher, expand(suite, _source(args), launcher=launcher)


def _cmd_plan(args) -> int:
    """Every run `run` would consider, its state and what `run` would do; trains and writes nothing."""
    from .status import add_costs, format_plan, plan_rows

    suite, launcher, specs = _prepare(args)
    _warn_legacy(args.results, suite.name)
    rows = plan_rows(specs, args.results, accept_stale=args.accept_stale, grid=list(suite.grid))
    tflops, mfu = getattr(args, "gpu_tflops", None), getattr(args, "mfu", None)
    footer = None
    if getattr(args, "cost", False) or tflops is not None or mfu is not None:  # never reads the dataset
        if (tflops is not None and tflops <= 0) or (mfu is not None and not 0 < mfu <= 1):
            raise BenchError("--gpu-tflops must be > 0 and --mfu in (0, 1]")
        world = suite.launcher.nodes * suite.launcher.tasks_per_node if launcher == "slurm" else 1
        footer = add_costs(rows, specs, world, tflops, mfu, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_plan(rows, suite.name, args.results / "runs" / suite.name, launcher, footer=footer))
    return 0


def _cmd_run(args) -> int:
    from .launch import launch_suite

    if args.dry_run:
        return _cmd_plan(args)
    suite, launcher, specs = _prepare(args)
    _warn_legacy(args.results, suite.name)
    _check_data(suite, launcher, args.results)
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

    suite = load_suite(args.suite, args.set)
    _warn_legacy(args.results, suite.name)
    rows = run_rows(expand(suite, _source(args)), args.results)
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


def _report_summary(path: Path) -> str:
    """What `report` prints: the report's first sentence, its "## Summary" bullets and the files written."""
    lines = path.read_text().splitlines()
    first = next((line for line in lines if line.startswith("Generated from")), "")
    out = [first.split("). ")[0] + (")." if "). " in first else "")] if first else []
    if "## Summary" in lines:
        bullets = []
        for line in lines[lines.index("## Summary") + 1 :]:
            if line.startswith("- "):
                bullets.append(line)
            elif bullets or line.startswith("#"):
                break
        out += ["", "Summary:", *bullets]
    folder = path.parent
    tables = sorted((folder / "leaderboards").glob("*.csv"))
    plots = sorted((folder / "plots").glob("*.png"))
    written = [f"{path} (the full report)"]
    if (folder / "leaderboard.csv").is_file():
        written.append(str(folder / "leaderboard.csv"))
    if tables:
        written.append(f"{len(tables)} tables in {folder / 'leaderboards'}/")
    if plots:
        written.append(f"{len(plots)} plots in {folder / 'plots'}/")
    return "\n".join([*out, "", "wrote " + ", ".join(written)])


def _cmd_report(args) -> int:
    path = _write_report(args.results, args.suite, args.out)
    print(_report_summary(path))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_list(args) -> int:
    # metadata from the catalog: no strategy module (nor torch) is imported while its cache is valid;
    # provenance: a plugin that does not set `interpretation` itself is "unlabelled" (catalog.provenance)
    from .catalog import strategies

    for name, info in strategies(args.plugin).items():
        print(
            f"{name:14s} {info.provenance:14s} {info.summary}\n{'':29s} source: {info.source or '-'}\n"
            f"{'':29s} params: {info.params or '-'}"
        )
    suites = sorted(Path("suites").glob("*.yaml")) + sorted(Path("suites").glob("*/*.yaml"))
    if suites:
        print("suites: " + ", ".join(str(p) for p in suites))
    return 0


def _cmd_masks(args) -> int:
    from .gallery import AFTER_WARMUP, check_data, check_request, dump, parse_params, plan_masks, render, suite_setup
    from .masking import load_plugin

    epoch = AFTER_WARMUP if args.epoch is None else args.epoch
    check_request(args.ratio, args.n, args.seed, epoch)  # before plugins, data or models are loaded
    if args.data is not None:
        check_data(args.data, args.image_size)
    params = parse_params(args.param)
    setup = suite_setup(args.suite, args.strategy) if args.suite else None
    for plugin in list(args.plugin) + (setup.plugins if setup else []):
        load_plugin(plugin)
    # explicit flags win over the suite; data a flag does not name comes from the suite, the
    # checkpoint's run config, else Fashion-MNIST
    from_suite = setup is not None and args.data is None
    listed = setup is not None and setup.params is not None
    masks = plan_masks(
        setup.strategy if setup else args.strategy,
        args.ratio,
        seed=args.seed,
        n=args.n,
        params={**setup.params, **params} if listed else params,
        checkpoint=args.checkpoint,
        method=args.method or (setup.method if setup else "mae"),
        preset=args.model or (setup.preset if setup else "cpu-tiny"),
        epoch=epoch,
        data=args.data or (setup.data if setup else None),
        data_root=args.root if args.root is not None or not from_suite else setup.root,
        image_size=args.image_size if args.image_size is not None or not from_suite else setup.image_size,
        overrides=setup.overrides if setup and not args.model else None,
        study_defaults=not listed,
        label=f"{setup.label} ({args.suite})" if setup else None,
    )
    if args.dump:
        print(f"wrote {dump(masks, args.dump)}", file=sys.stderr)
    if args.out or not args.dump:
        out = args.out or Path(f"masks_{args.strategy}.png")
        print(f"wrote {render(masks, out)}", file=sys.stderr)
    ratios = masks["ratio"]
    print(f"{args.strategy}: hidden ratio mean {ratios.mean():.3f} (min {ratios.min():.3f}, max {ratios.max():.3f})")
    return 0


def _cmd_export(args) -> int:
    from .export import export_run

    recipe = export_run(args.run_dir, args.out, args.pool)
    for path in recipe["paths"]:
        print(f"wrote {path}", file=sys.stderr)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in recipe["kwargs"].items())
    print(f"timm.create_model({recipe['timm_model']!r}, pretrained=False, {kwargs})")
    return 0


def _cmd_prepare(args) -> int:
    """Decode the suite's datasets once into the shared prepared cache (masking_bench.prepared)."""
    from .prepared import prepare_suite

    if args.workers is not None and args.workers < 1:
        raise BenchError(f"--workers must be >= 1, got {args.workers}")
    for prep, wrote, seconds in prepare_suite(args.suite, args.results, args.workers, not args.no_progress):
        rate = f"{prep.count / seconds:.0f} img/s" if wrote else "already prepared"
        print(f"{prep.folder}  {prep.count} images  {prep.disk_bytes() / 1e6:.1f} MB  {rate} ({seconds:.1f} s)")
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


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a suite field before validation, value parsed as YAML (repeatable): "
        "--set train.epochs=2 --set ratios=[0.6,0.9]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m masking_bench", description="Benchmark masking strategies for MIM pre-training of ViTs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (skips finished runs, resumes partial ones)")
    pln = sub.add_parser("plan", help="what `run` would do with each run (state, hash); trains and writes nothing")
    for p in (run, pln):
        p.add_argument("suite", type=Path, help="suite YAML, e.g. suites/smoke.yaml")
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results)")
        p.add_argument("--plugin", action="append", default=[], metavar="FILE", help="strategy file to load")
        _add_set(p)
        p.add_argument(
            "--launcher",
            choices=("local", "debug", "slurm"),
            default=None,
            help="where runs execute (default: the suite's launcher.kind, else local)",
        )
        p.add_argument(
            "--accept-stale",
            action="store_true",
            help="count runs finished by older code as done (the report marks them [STALE])",
        )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--no-wait", action="store_true", help="slurm: return right after submission (follow with `status`)"
    )
    run.add_argument("--dry-run", action="store_true", help="print the plan (as `plan` does) and stop")
    run.set_defaults(func=_cmd_run)
    pln.add_argument(
        "--cost",
        action="store_true",
        help="add cost estimates per run: GFLOP per image, PFLOP, GPU-hours, peak memory per GPU, data size "
        "(measures a fresh model of each run's shape on CPU; reads no dataset)",
    )
    pln.add_argument(
        "--gpu-tflops",
        type=float,
        default=None,
        metavar="T",
        help="peak TFLOP/s of one GPU for the GPU-hours (implies --cost; default 312, an A100's bf16 dense peak)",
    )
    pln.add_argument(
        "--mfu",
        type=float,
        default=None,
        metavar="F",
        help="assumed model-FLOPs utilisation in (0, 1] (implies --cost; default 0.4)",
    )
    pln.set_defaults(func=_cmd_plan)

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
    _add_set(sta)
    sta.set_defaults(func=_cmd_status)

    rep = sub.add_parser("report", help="regenerate the leaderboard from run records")
    rep.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    rep.add_argument("--suite", default=None, help="only this suite's runs")
    rep.add_argument("--out", type=Path, default=None, help="write here instead of the results folder")
    rep.set_defaults(func=_cmd_report)

    msk = sub.add_parser("masks", help="render / dump a strategy's masks on a dataset's test images")
    msk.add_argument("strategy", help="strategy name (with --suite: one of the suite's labels or names)")
    msk.add_argument("--ratio", type=float, default=0.75, help="masking ratio in (0, 1) (default 0.75)")
    msk.add_argument("--seed", type=int, default=0, help="seed of the masks and of a fresh model (default 0)")
    msk.add_argument("--n", type=int, default=8, help="the first N test images, N in 1..64 (default 8)")
    msk.add_argument("--checkpoint", default=None, help="a run's checkpoint.pt (else a seeded fresh model)")
    msk.add_argument("--method", choices=("mae", "simmim"), default=None, help="default: the suite's, else mae")
    msk.add_argument("--model", default=None, help="preset without a checkpoint (default: the suite's, else cpu-tiny)")
    msk.add_argument(
        "--suite",
        type=Path,
        default=None,
        help="take data, model, method and the strategy's params from this suite YAML (flags still win)",
    )
    msk.add_argument(
        "--data",
        default=None,
        metavar="NAME",
        help="fashion_mnist, cifar10, imagefolder or synthetic (default: the suite's or checkpoint's, else "
        "fashion_mnist)",
    )
    msk.add_argument("--root", default=None, metavar="DIR", help="dataset folder (never downloaded)")
    msk.add_argument("--image-size", type=int, default=None, metavar="N", help="imagefolder/synthetic side in pixels")
    msk.add_argument("--epoch", type=int, default=None, help="planning epoch >= 0 (default: after any warm-up)")
    msk.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="strategy parameter")
    msk.add_argument("--plugin", action="append", default=[], metavar="FILE")
    msk.add_argument("--out", type=Path, default=None, help="PNG gallery path")
    msk.add_argument("--dump", type=Path, default=None, help=".npz path")
    msk.set_defaults(func=_cmd_masks)

    lst = sub.add_parser("list", help="list strategies and suites")
    lst.add_argument("--plugin", action="append", default=[], metavar="FILE")
    lst.set_defaults(func=_cmd_list)

    exp = sub.add_parser("export", help="write a run's encoder as timm VisionTransformer weights (+ create_model json)")
    exp.add_argument("run_dir", type=Path, help="a run folder with checkpoint.pt: results/runs/<suite>/<hash>")
    exp.add_argument("--out", type=Path, default=None, help="weights file (default: RUN_DIR/encoder.pth); .json beside")
    exp.add_argument(
        "--pool", choices=("mean", "cls"), default=None, help="features as eval.pool (default: the run's eval.pool)"
    )
    exp.set_defaults(func=_cmd_export)

    pre = sub.add_parser("prepare", help="decode a suite's datasets once into the shared on-disk cache")
    pre.add_argument("suite", type=Path, help="suite YAML")
    pre.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="cache in RESULTS/prepared unless $MASKING_BENCH_PREPARED is set (default: results)",
    )
    pre.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: the cores this process may use)"
    )
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=_cmd_prepare)

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
