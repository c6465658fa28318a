"""`ddm eval`'s tables: each metric as mean ± 95% interval over sampling seeds, the held-out reference,
the router's accuracy and calibration per t-bucket, and the gmm closed-form checks (markdown)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["metric_table", "reference_lines", "to_markdown"]


def metric_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the strategy table: each metric as `mean ± half-width` (95%, over seeds)."""
    rows = results["rows"]
    metrics = list(dict.fromkeys(k for r in rows for k in r
                                 if k not in ("strategy", "per_seed") and not k.endswith("_ci95")))
    cells = [[r["strategy"]] + [_fmt(r.get(m), r.get(f"{m}_ci95")) for m in metrics] for r in rows]
    return ["strategy"] + metrics, cells


def reference_lines(results: dict) -> list[str]:
    ref = dict(results.get("reference") or {})
    lines = []
    if "against" in ref:
        lines.append(f"Measured against: {ref.pop('against')}.")
    fd = ref.pop("fd_real_vs_target", None)
    if fd:
        lines.append(f"Real-vs-real reference (what real data scores at the same sample size): {fd['draws']} draws "
                     f"of {fd['n']} real training rows against the same target give Fréchet distance "
                     f"{fd['mean']:.3g} (95% of draws in {fd['p2.5']:.3g}-{fd['p97.5']:.3g}).")
    if ref:
        lines.append("Reference: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in ref.items()))
    return lines


def to_markdown(results: dict) -> str:
    s = results["sampling"]
    seeds = results.get("seeds", [0])
    lines = [f"## Evaluation of {results['run']}", "",
             f"{results['source']}: {results['num_samples']} samples per strategy and seed, {s['steps']} {s['solver']} "
             f"steps, CFG {s['cfg_scale']}; experts {results['experts']}"
             + (f", missing {results['missing']}" if results["missing"] else ""),
             "", f"Each metric: mean ± 95% interval (Student t) over {len(seeds)} sampling seeds {seeds}.", ""]
    header, cells = metric_table(results)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    ref = reference_lines(results)
    if ref:
        lines += [""] + ref
    router = results.get("router")
    if router:
        lines += ["", f"Router on {router['rows']} noised held-out rows per t-bucket (target: the row's k-means "
                  "cluster): top-1 accuracy / ECE", "",
                  "| t | " + " | ".join(v.replace("|", "\\|") for v in router["variants"]) + " |",
                  "|" + "---|" * (len(router["variants"]) + 1)]
        for i, bucket in enumerate(router["t_buckets"]):
            lines.append(f"| {bucket} | " + " | ".join(f"{v['accuracy'][i]:.3f} / {v['ece'][i]:.3f}"
                                                        for v in router["variants"].values()) + " |")
    fields = results.get("gmm_fields")
    if fields:
        keys = [k for k in fields if k != "t"]
        lines += ["", "GMM fields vs closed form (router: total variation to p(k | x_t, t); velocity: "
                  "E||v - u||^2 / E||u||^2 against the exact marginal velocity, eq. 7)", "",
                  "| t | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for i, t in enumerate(fields["t"]):
            lines.append(f"| {t} | " + " | ".join(_fmt(fields[k][i]) for k in keys) + " |")
    for note in results["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, half: Any = None) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}" if math.isfinite(value) else str(value)
        return text + (f" ± {half:.2g}" if isinstance(half, float) else "")
    return "" if value is None else str(value)
