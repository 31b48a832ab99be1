"""The table of SAEBench's headline numbers: read from its result files, written as
saebench.json, saebench.md and saebench.png."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sae_lens_kl.saebench.specs import OFFLINE_EVALS, RESULT_SUFFIX, OfflineEval
from sae_lens_kl.staging import staged_files, write_file


def read_headlines(spec: OfflineEval, eval_dir: Path, names: list[str]) -> dict[str, dict[str, float | None]]:
    """{metric label: {sae name: value}} from SAEBench's result files (-1 is SAEBench's NaN)."""
    results = {name: json.loads((eval_dir / f"{name}{RESULT_SUFFIX}").read_text()) for name in names}
    rows: dict[str, dict[str, float | None]] = {}
    for headline in spec.headlines:
        row = {}
        for name in names:
            value = results[name]["eval_result_metrics"].get(headline.category, {}).get(headline.metric)
            row[name] = None if value is None else float(value)
        if any(value is not None for value in row.values()):
            rows[headline.label] = row
    return rows


def read_standard_errors(
    spec: OfflineEval, eval_dir: Path, names: list[str]
) -> dict[str, dict[str, float | None]]:
    """{metric label: {sae name: standard error}} for the headlines whose spread SAEBench reports:
    its standard deviation over the units of the mean (absorption's letters, one result detail
    each) over the square root of their count."""
    results = {name: json.loads((eval_dir / f"{name}{RESULT_SUFFIX}").read_text()) for name in names}
    errors: dict[str, dict[str, float | None]] = {}
    for headline in spec.headlines:
        if headline.spread is None:
            continue
        row: dict[str, float | None] = {}
        for name, result in results.items():
            deviation = result["eval_result_metrics"].get(headline.category, {}).get(headline.spread)
            units = len(result.get("eval_result_details") or [])
            row[name] = None if deviation is None or deviation < 0 or units < 2 else deviation / units**0.5
        errors[headline.label] = row
    return errors


def markdown(table: Mapping[str, Any]) -> str:
    names = table["saes"]
    first = names[0]
    header = ["eval", "metric", *names, *[f"{n} − {first}" for n in names[1:]]]
    lines = [
        f"# SAEBench: {', '.join(names)}"
        + (" (--quick: a smoke test, not a measurement)" if table.get("quick") else ""),
        "",
        f"Model {table['model_name']}, hook {table['hook_name']}, sae-bench {table['sae_bench_version']}. "
        "Arrows: which way SAEBench counts as better (↑ higher, ↓ lower, · neither). ± : SAEBench's "
        "standard error where it reports a spread (absorption: over letters); core and meta_structure "
        "report means only, so a difference there has no interval from SAEBench.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    arrows = {1: "↑", -1: "↓", 0: "·"}
    for eval_name, rows in table["evals"].items():
        better = {h.label: h.better for h in OFFLINE_EVALS[eval_name].headlines}
        errors = table.get("standard_errors", {}).get(eval_name, {})
        for label, row in rows.items():
            cells = [_fmt(row[n]) + _plus_minus(errors.get(label, {}).get(n)) for n in names]
            diffs = [
                _fmt(None if row[n] is None or row[first] is None else row[n] - row[first], signed=True)
                for n in names[1:]
            ]
            lines.append(
                f"| {eval_name} | {label} {arrows[better[label]]} | " + " | ".join(cells + diffs) + " |"
            )
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in table["wall_seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def _plus_minus(error: float | None) -> str:
    return "" if error is None else f" ± {error:.2g}"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def write_table(table: Mapping[str, Any], out: Path) -> None:
    """saebench.json, saebench.md and saebench.png (one panel per headline number, a bar per SAE)."""
    from matplotlib.figure import Figure

    write_file(out / "saebench.json", json.dumps(table, indent=2, default=str))
    write_file(out / "saebench.md", markdown(table))
    panels = [
        (eval_name, label, row) for eval_name, rows in table["evals"].items() for label, row in rows.items()
    ]
    columns = min(4, len(panels))
    n_rows = -(-len(panels) // columns)
    figure = Figure(figsize=(3.4 * columns, 2.8 * n_rows))
    axes = figure.subplots(n_rows, columns, squeeze=False).ravel()
    names = table["saes"]
    for axis, (eval_name, label, row) in zip(axes, panels, strict=False):
        shown = [n for n in names if row[n] is not None]
        values = [row[n] for n in shown]
        errors = table.get("standard_errors", {}).get(eval_name, {}).get(label, {})
        spread = [errors.get(n) or 0.0 for n in shown]
        bars = axis.bar(
            shown,
            values,
            yerr=spread if any(spread) else None,
            capsize=3,
            color=[f"C{names.index(n)}" for n in shown],
        )
        axis.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=7)
        # from 0 (or the values' sign): a zoomed axis made a change of 0.0006 look like a collapse
        low = min(0.0, *(v - e for v, e in zip(values, spread, strict=True)))
        high = max(0.0, *(v + e for v, e in zip(values, spread, strict=True)))
        pad = (high - low) * 0.15 or 1.0
        axis.set_ylim(low - (pad if low < 0 else 0), high + (pad if high > 0 else 0))
        axis.set_title(f"{eval_name}\n{label.split('.', 1)[1]}", fontsize=9)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    title = "error bars: SAEBench's standard error where it reports a spread (absorption, over letters)"
    if table.get("quick"):
        title = "--quick: a smoke test at small sizes, not a measurement; " + title
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with staged_files(out) as staging:
        figure.savefig(staging / "saebench.png", dpi=90)
