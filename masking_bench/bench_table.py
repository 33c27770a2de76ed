"""What ``bench`` prints: the measured figures as a table with their targets, and the projected wall
time of the shipped suites from the measured rates (steps per strategy × step time + evaluation
images / feature-extraction rate)."""

from __future__ import annotations

import math
from typing import Any

from .bench import PLAN_STRATEGIES, TARGETS, bench_dataset
from .data import Dataset

# ------------------------------------------------------------------------------ suite projections


def suite_workload(path, dataset: Dataset | None = None) -> dict[str, Any]:
    """What a suite asks for: optimizer steps per strategy label and feature-extraction images.

    Mirrors ``train._pretrain`` (``len(loader)`` steps per epoch, drop_last) and
    ``evaluate.evaluate_encoder`` (test + probe-train + low-shot images, per evaluation).
    """
    from .config import expand, load_suite

    suite = load_suite(path)
    ds = dataset or bench_dataset("auto")
    n_train, n_test = len(ds.train), len(ds.test)
    steps: dict[str, int] = {}
    images = 0
    runs = 0
    for spec in expand(suite, str(path)):
        runs += 1
        ev = spec.eval

        def eval_images(protocols, ev=ev) -> int:
            n = min(ev.probe.test_subset or n_test, n_test)
            if "probe" in protocols or "knn" in protocols:
                n += min(ev.probe.train_subset or n_train, n_train)
            if "low_shot" in protocols and ev.low_shot is not None:
                n += sum(ev.low_shot.shots) * ds.num_classes * ev.low_shot.draws
            return n

        images += eval_images(("probe", "knn", "low_shot"))
        if spec.kind != "pretrain" or spec.train.epochs == 0:
            continue
        t = spec.train
        per_epoch = min(spec.data.train_subset or n_train, n_train) // t.batch_size
        key = _plan_label(spec.strategy.name, spec.strategy.params)
        steps[key] = steps.get(key, 0) + per_epoch * t.epochs
        if ev.every:
            images += sum(
                eval_images(tuple(ev.every_protocols))
                for e in range(t.epochs)
                if (e + 1) % ev.every == 0 and e + 1 < t.epochs
            )
    return {"runs": runs, "steps": steps, "eval_images": images}


def _plan_label(name: str, params: dict) -> str:
    for label, (n, p) in PLAN_STRATEGIES.items():
        if n == name and all(params.get(k) == v for k, v in p.items()):
            return label
    return name


def project_suite(path, results: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    """Projected wall time of a suite from measured rates: Σ steps × that strategy's step time +
    feature-extraction images / measured images/s, at the median rounds (the load of the moment)
    and at the best rounds (≈ an idle machine). Not counted: probe-head training, kNN, checkpoints,
    process start-up (seconds per run). ``workers`` processes share the machine evenly."""
    work = suite_workload(path)
    plan = results["plan"]["strategies"]
    fallback = plan.get("random", next(iter(plan.values())))

    def train_seconds(key: str) -> float:
        return sum(n * plan.get(k, fallback).get(key, float("nan")) / 1e3 for k, n in work["steps"].items())

    ev = results["eval"]
    eval_s, eval_best = (
        work["eval_images"] / ev["img_per_s"],
        work["eval_images"] / ev.get("img_per_s_best", ev["img_per_s"]),
    )
    out = {**work, "workers": workers, "train_s": train_seconds("step_ms"), "eval_s": eval_s}
    out["total_min"] = (out["train_s"] + eval_s) / 60 / workers
    out["total_best_min"] = (train_seconds("step_best_ms") + eval_best) / 60 / workers
    out["total_fast_train_min"] = (train_seconds("fast_step_ms") + eval_s) / 60 / workers
    out["total_fast_train_best_min"] = (train_seconds("fast_step_best_ms") + eval_best) / 60 / workers
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of every figure with its target (printed by ``bench`` and the pytest summary)."""
    rows: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "" if ok is None else ("meets" if ok else "MISSES")

    if "step" in results:
        s = results["step"]
        rows.append(
            (
                "1. training step / plain reference step",
                f"{s['ratio']:.2f}x ({s['product_img_per_s']:.0f} vs {s['reference_img_per_s']:.0f} img/s)",
                f">= {TARGETS['step_vs_reference']:.2f}x",
                verdict(s["ratio"] >= TARGETS["step_vs_reference"]),
            )
        )
        for k in s:
            if k.endswith("_vs_reference") and k != "product_vs_reference":
                name = k[: -len("_vs_reference")]
                rows.append(
                    (
                        f"   variant '{name}' / reference",
                        f"{s[k]:.2f}x ({s[name + '_img_per_s']:.0f} img/s)",
                        f">= {TARGETS['step_vs_reference']:.2f}x",
                        verdict(s[k] >= TARGETS["step_vs_reference"]),
                    )
                )
    if "flops" in results:
        f = results["flops"]
        rows.append(("2. FLOPs per image (fwd + bwd)", f"{f['flops_per_image'] / 1e6:.1f} MFLOP", "", ""))
        for tag in [k[: -len("_fraction")] for k in f if k.endswith("_fraction")]:
            pk = f[tag + "_peak"]
            rows.append(
                (
                    f"   step {tag}: achieved / {pk} matmul peak",
                    f"{100 * f[tag + '_fraction']:.0f}% "
                    f"({f[tag + '_gflops']:.1f} / {f['peak_' + pk + '_gflops']:.0f} GFLOP/s)",
                    f">= {100 * TARGETS['flops_fraction']:.0f}%",
                    verdict(f[tag + "_fraction"] >= TARGETS["flops_fraction"]),
                )
            )
    if "plan" in results:
        p = results["plan"]
        for label, v in p["strategies"].items():
            fast = f"; {100 * v['share_fast']:.1f}% of the bf16 step" if "share_fast" in v else ""
            rows.append(
                (
                    f"3. mask planning share: {label}",
                    f"{100 * v['share']:.2f}% ({v['plan_ms']:.1f} ms of {v['step_ms']:.0f} ms{fast})",
                    f"<= {100 * TARGETS['plan_share']:.0f}%",
                    verdict(v["share"] <= TARGETS["plan_share"]),
                )
            )
    if "data" in results:
        d = results["data"]
        rows.append(
            (
                "4. data pipeline / model consumption",
                f"{d['ratio']:.0f}x ({d['loader_batches_per_s']:.0f} vs {d['model_steps_per_s']:.2f} batches/s)",
                f">= {TARGETS['data_vs_model']:.0f}x",
                verdict(d["ratio"] >= TARGETS["data_vs_model"]),
            )
        )
    if "eval" in results:
        e = results["eval"]
        rows.append(
            (
                "5. eval feature extraction",
                f"{e['img_per_s']:.0f} img/s ({e['flops_per_image'] / 1e6:.0f} MFLOP/img, "
                f"{100 * e['fraction']:.0f}% of fp32 matmul)",
                "-",
                "",
            )
        )
    m = results.get("machine", {})
    workers = max(1, (m.get("cpu_count") or 1) // max(1, m.get("threads") or 1)) if m.get("device") == "cpu" else 1
    for path, proj in results.get("suites", {}).items():
        line = (
            f"{proj['total_min']:.1f} min (fastest rounds {proj['total_best_min']:.1f}; train "
            f"{proj['train_s'] / 60:.1f} + eval {proj['eval_s'] / 60:.1f})"
        )
        if math.isfinite(proj["total_fast_train_min"]):
            line += f", with bf16 steps {proj['total_fast_train_min']:.1f}"
        if workers > 1:
            line += f"; / {workers} one-process-per-core workers: {proj['total_min'] / workers:.1f}"
        rows.append((f"   projected {path} ({proj['runs']} runs, 1 process)", line, "", ""))
    header = ("figure", "measured", "target", "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = []
    m = results.get("machine")
    if m:
        lines.append(
            f"machine: {m.get('cpu')} ({m.get('cpu_count')} logical CPUs), device {m.get('device')}"
            + (f" [{m['gpu']}]" if m.get("gpu") else "")
            + f", torch {m.get('torch')}, "
            f"{m.get('threads')} thread(s), load average {m.get('loadavg_1m')} -> {m.get('loadavg_1m_end', '?')}"
        )
        lines.append(
            f"ISA {m.get('isa')}: train.amp auto trains in {m.get('amp_auto')} here ({m.get('amp_auto_why')})"
            + ("" if m.get("native_bf16", True) else "; bf16 not measured (emulated on this host)")
        )
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths).rstrip())
    for r_ in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r_, widths, strict=True)).rstrip())
    return "\n".join(lines)


def scalars(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a figure's result to JSON scalars (for ``benchmark.extra_info``); raw timings dropped."""
    out: dict[str, Any] = {}
    for k, v in result.items():
        if k == "timings":
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}."))
        elif isinstance(v, float):
            out[prefix + k] = round(v, 5)
        elif isinstance(v, (int, str, bool)) or v is None:
            out[prefix + k] = v
    return out
