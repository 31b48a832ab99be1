"""Run reports: report.json, a human-readable report.md, and PNG plots."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sae_lens.saes.sae import TrainStepOutput

from sae_lens_kl.trainer import KLFinetuneTrainer

ROWS = (
    ("ce_clean", "clean CE (nats/token)"),
    ("ce_spliced", "spliced CE"),
    ("ce_gap", "CE gap (spliced − clean)"),
    ("ce_ablated", "zero-ablation CE"),
    ("ce_score", "CE-loss score"),
    ("kl", "KL(clean ‖ spliced)"),
    ("kl_score", "KL score"),
    ("l0", "L0"),
    ("mse", "MSE (sum over dims)"),
    ("explained_variance", "explained variance"),
    ("dead_latents", "dead latents"),
    ("n_tokens", "evaluated positions"),
)


class History:
    """A `kl_finetune` callback keeping the per-step curves: tokens, KL, MSE, alpha, L0, LR."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def __call__(self, trainer: KLFinetuneTrainer, output: TrainStepOutput) -> None:
        self.rows.append(
            {
                "tokens": trainer.n_training_samples,
                "kl": output.metrics["kl"],
                "mse": output.losses["mse_loss"].item(),
                "alpha": output.metrics["alpha"],
                "l0": output.metrics["l0"],
                "lr": trainer.optimizer.param_groups[0]["lr"],
            }
        )


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(title: str, runs: Mapping[str, Mapping[str, Any]], notes: list[str]) -> str:
    """A before/after table. `runs` maps a column name to a kl_finetune report (its 'before' is the
    first column)."""
    names = list(runs)
    first = runs[names[0]]
    header = ["metric", "before", *[f"after: {n}" for n in names]]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in ROWS:
        cells = [_fmt(first["before"][key])] + [_fmt(runs[n]["after"][key]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    extra = (
        ("fraction of CE gap closed", lambda r: _fmt(r["fraction_ce_gap_closed"])),
        ("training tokens", lambda r: _fmt(r["training_tokens"])),
        ("training steps", lambda r: _fmt(r["steps"])),
        ("lr", lambda r: _fmt(r["config"]["lr"])),
        ("loss", lambda r: r["config"]["loss"]),
        ("train wall time (s)", lambda r: _fmt(r["train_seconds"])),
        ("train tokens/s", lambda r: _fmt(r["train_tokens_per_second"])),
    )
    for label, cell in extra:
        lines.append(f"| {label} | | " + " | ".join(cell(runs[n]) for n in names) + " |")
    lines += ["", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def _atomic_write(path: Path, data: bytes) -> None:
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as stream:
        stream.write(data)
    os.replace(staging, path)


def write_report(
    out_dir: Path,
    title: str,
    runs: Mapping[str, Mapping[str, Any]],
    history: History | None,
    notes: list[str],
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """report.json, report.md, training_curves.png (if a history is given), before_after.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "title": title,
        "runs": dict(runs),
        "history": history.rows if history else [],
        "notes": notes,
        **(extra or {}),
    }
    _atomic_write(out_dir / "report.json", json.dumps(payload, indent=2).encode())
    _atomic_write(out_dir / "report.md", markdown(title, runs, notes).encode())
    written = [out_dir / "report.json", out_dir / "report.md"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history and history.rows:
        keys = ("kl", "mse", "alpha", "l0", "lr")
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
        tokens = [row["tokens"] for row in history.rows]
        for axis, key in zip(axes, keys, strict=True):
            axis.plot(tokens, [row[key] for row in history.rows], marker=".")
            axis.set_title(key)
            axis.set_xlabel("training tokens")
        fig.tight_layout()
        fig.savefig(out_dir / "training_curves.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "training_curves.png")

    names = list(runs)
    first = runs[names[0]]
    bars = ("ce_gap", "kl", "mse")
    fig, axes = plt.subplots(1, len(bars), figsize=(4 * len(bars), 3.2))
    for axis, key in zip(axes, bars, strict=True):
        labels = ["before", *names]
        values = [first["before"][key], *[runs[n]["after"][key] for n in names]]
        axis.bar(labels, values, color=["grey", *["C0", "C1", "C2", "C3"][: len(names)]])
        axis.set_title(key)
        axis.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out_dir / "before_after.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "before_after.png")
    return written
