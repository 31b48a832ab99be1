"""What a fine-tune leaves behind: the SAELens artifact with its config and metrics, the run
report dict, report.json, a human-readable report.md, and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.sae import TrainStepOutput
from safetensors.torch import save_file

from sae_lens_kl import save_dir as owned
from sae_lens_kl.checkpoints import CHECKPOINTS_DIRNAME
from sae_lens_kl.controller import SparsityController
from sae_lens_kl.eval_result import EvalResult
from sae_lens_kl.intervals import fraction_closed, paired_intervals, undefined_reason
from sae_lens_kl.save_dir import CONFIG_FILENAME, MANIFEST_FILENAME, METRICS_FILENAME
from sae_lens_kl.staging import staged_files, write_file
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
    evaluated = first["before"] is not None and all(runs[n]["after"] is not None for n in names)
    for key, label in ROWS if evaluated else ():
        cells = [_fmt(first["before"][key])] + [_fmt(runs[n]["after"][key]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if not evaluated:
        notes = ["No held-out evaluation (eval_tokens=0): no before/after metrics.", *notes]
    for hook in first["before"].get("downstream_mse", {}) if evaluated else ():
        cells = [_fmt(first["before"]["downstream_mse"][hook])]
        cells += [_fmt(runs[n]["after"]["downstream_mse"][hook]) for n in names]
        lines.append(f"| spliced − clean at {hook} (sum of squares) | " + " | ".join(cells) + " |")
    extra = (
        ("fraction of CE gap closed [95 % paired bootstrap]", _fraction_cell),
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


def _fraction_cell(report: Mapping[str, Any]) -> str:
    """The fraction of the CE gap closed with its interval, or why it is undefined."""
    if report.get("fraction_ce_gap_closed_note"):
        return "undefined (starting gap ≤ 0)"
    interval = report.get("fraction_ce_gap_closed_interval")
    cell = _fmt(report.get("fraction_ce_gap_closed"))
    return cell if interval is None else f"{cell} [{interval[0]:.4f}, {interval[1]:.4f}]"


def run_report(
    trainer: KLFinetuneTrainer,
    *,
    hook_name: str,
    prefix_reuse: bool,
    before: EvalResult | None,
    after: EvalResult | None,
    controller: SparsityController | None,
    train_seconds: float,
    resumed_tokens: int,
    wall_seconds: float,
) -> dict[str, Any]:
    """The fine-tune's report: resolved config, before/after metrics, fraction of the CE gap
    closed, timing; stored in the SAE's metadata (`kl_finetune`) and kl_finetune_metrics.json."""
    trained_now = trainer.n_training_samples - resumed_tokens
    report: dict[str, Any] = {
        "config": trainer.ft_cfg.to_dict(),
        "hook_name": hook_name,
        "training_tokens": trainer.n_training_samples,
        "resumed_from_tokens": resumed_tokens,
        "processes": trainer.parallel.world_size,
        "steps": trainer.n_training_steps,
        "train_seconds": train_seconds,
        "train_tokens_per_second": trained_now / train_seconds if train_seconds > 0 else None,
        "wall_seconds": wall_seconds,
        "prefix_reuse": prefix_reuse,
        "before": before.to_dict() if before else None,
        "after": after.to_dict() if after else None,
        "fraction_ce_gap_closed": None,
    }
    if before and after:
        report["fraction_ce_gap_closed"] = fraction_closed(before, after)
        if (reason := undefined_reason(before)) is not None:
            report["fraction_ce_gap_closed_note"] = reason
        elif len(before.per_sequence.get("n_tokens", ())) >= 2:
            intervals = paired_intervals(before, {"after": after})
            report["fraction_ce_gap_closed_interval"] = intervals["fraction_ce_gap_closed"]["after"]
    if controller is not None:
        scheduler = trainer.coefficient_schedulers[controller.coefficient_name]
        report["sparsity_controller"] = controller.state_dict(scheduler)
    return report


def save_artifact(
    tuned: SAE[Any],
    trainer: KLFinetuneTrainer,
    report: dict[str, Any],
    save_dir: Path,
) -> None:
    """The SAELens folder (cfg.json, sae_weights.safetensors, sparsity.safetensors) plus the
    fine-tune's config and metrics, appearing in save_dir together (one atomic exchange of
    folders; where the filesystem cannot, cfg.json, without which SAELens loads nothing, goes
    last and an older one first: an old cfg.json never stands beside new weights). What an earlier
    run wrote there and this one does not rewrite goes in the same exchange, and the manifest
    records what this package wrote; the earlier run's checkpoints set aside go after it."""
    writing = {SAE_CFG_FILENAME, SPARSITY_FILENAME, CONFIG_FILENAME, METRICS_FILENAME, MANIFEST_FILENAME}
    writing |= {module.filename for module in trainer.modules} | {SAE_WEIGHTS_FILENAME}
    if (save_dir / CHECKPOINTS_DIRNAME).is_dir():  # this run's, written as it went
        writing.add(CHECKPOINTS_DIRNAME)
    stale = owned.stale_entries(save_dir, writing)
    with staged_files(save_dir, last=SAE_CFG_FILENAME, remove=stale) as staging:
        tuned.save_model(staging)
        save_file({"sparsity": trainer.log_feature_sparsity}, staging / SPARSITY_FILENAME)
        (staging / CONFIG_FILENAME).write_text(json.dumps(report["config"], indent=2))
        (staging / METRICS_FILENAME).write_text(json.dumps(report, indent=2))
        for module in trainer.modules:  # an adapter, LoRA on the LM: each its own file
            module.save(staging / module.filename)
        if unexpected := {path.name for path in staging.iterdir()} - writing:
            raise RuntimeError(f"save_artifact wrote {sorted(unexpected)}, which it does not list as ours.")
        (staging / MANIFEST_FILENAME).write_text(owned.manifest_text(save_dir, writing, stale))
    owned.finish(save_dir)


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
    write_file(out_dir / "report.json", json.dumps(payload, indent=2))
    write_file(out_dir / "report.md", markdown(title, runs, notes))
    written = [out_dir / "report.json", out_dir / "report.md"]
    # Figure objects, not pyplot: no global backend switch in the caller's process.
    if history and history.rows:
        keys = ("kl", "mse", "alpha", "l0", "lr")
        fig = Figure(figsize=(4 * len(keys), 3.2))
        axes = fig.subplots(1, len(keys))
        tokens = [row["tokens"] for row in history.rows]
        for axis, key in zip(axes, keys, strict=True):
            axis.plot(tokens, [row[key] for row in history.rows], marker=".")
            axis.set_title(key)
            axis.set_xlabel("training tokens")
        fig.tight_layout()
        save_figure(fig, out_dir / "training_curves.png")
        written.append(out_dir / "training_curves.png")

    names = list(runs)
    first = runs[names[0]]
    if first["before"] is None or any(runs[n]["after"] is None for n in names):  # eval_tokens=0
        owned.record_written(out_dir, [path.name for path in written])
        return written
    bars = ("ce_gap", "kl", "mse")
    fig = Figure(figsize=(4 * len(bars), 3.2))
    axes = fig.subplots(1, len(bars))
    for axis, key in zip(axes, bars, strict=True):
        labels = ["before", *names]
        values = [first["before"][key], *[runs[n]["after"][key] for n in names]]
        axis.bar(labels, values, color=["grey", *["C0", "C1", "C2", "C3"][: len(names)]])
        axis.set_title(key)
        axis.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    save_figure(fig, out_dir / "before_after.png")
    written.append(out_dir / "before_after.png")
    owned.record_written(out_dir, [path.name for path in written])
    return written


def save_figure(fig: Figure, path: Path) -> None:
    with staged_files(path.parent) as staging:
        fig.savefig(staging / path.name, dpi=100)
