"""An experiment's table (experiment.md) and figure (experiment.png), from its result."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sae_lens_kl.intervals import error_bars, format_interval
from sae_lens_kl.report import save_figure

COLUMNS = (
    ("ce_gap_before", "CE gap before"),
    ("ce_gap", "CE gap after"),
    ("fraction_of_ce_gap_closed", "CE gap closed"),
    ("fraction_interval", "95 % interval"),
    ("difference_from_reference", "minus the reference arm, 95 %"),
    ("kl", "KL after"),
    ("mse_before", "MSE before"),
    ("mse", "MSE after"),
    ("explained_variance", "EV after"),
    ("l0", "L0 after"),
    ("downstream_mse_last", "error at last layer"),
    ("encoder_cosine_p50", "enc. cos p50"),
    ("decoder_cosine_p50", "dec. cos p50"),
    ("train_seconds", "train s"),
)


def experiment_markdown(result: Mapping[str, Any]) -> str:
    lines = [f"# Experiment {result['experiment']}: {result['title']}", "", f"Paper: {result['paper']}", ""]
    lines += [
        "| arm | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for row in result["arms"]:
        cells = [
            f"{row[key]:.4f}" if "cosine" in key and row[key] is not None else _fmt(row[key])
            for key, _ in COLUMNS
        ]
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    settings = result["settings"]
    lines += [
        "",
        f"Differences: each arm minus {result.get('reference_arm', 'the first arm')} (of the same start), "
        "paired over the held-out sequences.",
        "",
        f"Model {settings['model']}, SAE at {settings['hook']} (d_sae {settings['d_sae']}), MSE phase "
        f"{settings['mse_phase_tokens']:,} tokens, each stage {settings['kl_tokens']:,} tokens; options "
        f"{json.dumps(settings['options'])}. 'before' is the arm's starting SAE (for end-to-end arms, "
        "the SAE at the start of the KL phase).",
        "",
    ]
    if settings.get("seeds", 1) > 1:
        lines += [
            f"Each arm ran {settings['seeds']} seeds (seed s: the s-th block of KL-phase tokens and "
            "init_seed s; arms from scratch also seed their MSE phase): every number is the mean over "
            "seeds, 'train s' their sum, and the intervals draw seeds as well as held-out sequences "
            "(paired by seed).",
            "",
        ]
    return "\n".join(lines)


def experiment_figure(result: Mapping[str, Any], path: Path) -> None:
    rows = result["arms"]
    names = [row["arm"] for row in rows]
    panels = [("fraction_of_ce_gap_closed", "CE gap closed"), ("mse", "MSE after"), ("l0", "L0 after")]
    if any(row["decoder_cosine_p50"] is not None for row in rows):
        panels.append(("decoder_cosine_p50", "decoder cos p50 (vs start)"))
    fig = Figure(figsize=(4 * len(panels), 3.6))
    for axis, (key, label) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        values = [row[key] or 0 for row in rows]
        errors = None
        if key == "fraction_of_ce_gap_closed" and any(row.get("fraction_interval") for row in rows):
            # the paired bootstrap interval as asymmetric error bars (none where it is undefined;
            # a percentile interval of a ratio may exclude its point estimate: clipped at 0)
            errors = error_bars(values, [row.get("fraction_interval") for row in rows])
            label += " (95 % interval)"
        axis.bar(range(len(rows)), values, yerr=errors, capsize=3)
        axis.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
        axis.set_title(label)
    fig.suptitle(f"Experiment {result['experiment']}")
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # an interval
        return format_interval(value)
    return str(value)
