"""The KL phase's lr × steps sweep: for each cell, KL+MSE and its MSE-only control from the same
MSE-phase SAE on the same tokens at the same lr and steps, both evaluated on the same held-out
sequences, with the paired 95 % interval of each fraction of the CE gap closed and of their
difference. This is how the demo's recipe is chosen (`sae-lens-kl sweep`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from sae_lens import SAE

from sae_lens_kl.api import kl_finetune
from sae_lens_kl.eval_result import EvalResult
from sae_lens_kl.intervals import error_bars, format_interval, fraction_closed, paired_intervals
from sae_lens_kl.report import save_figure
from sae_lens_kl.staging import write_file
from sae_lens_kl.train import kl_phase_sequences

ARMS = {"KL+MSE": "kl+mse", "MSE-only": "mse"}


def run_sweep(
    setup: Any, mse_sae: SAE[Any], lrs: list[float], steps: list[int], out: Path, *, overwrite: bool
) -> dict[str, Any]:
    """Every (lr, steps) cell on the demo `setup` (commands.demo.DemoSetup) from `mse_sae`; writes
    sweep.json, sweep.md and sweep.png in `out`."""
    if setup.evaluator is None:
        raise ValueError("The sweep compares held-out CE gaps: pass --eval-tokens > 0.")
    if any(lr <= 0 for lr in lrs) or any(n < 1 for n in steps):
        raise ValueError(f"lrs {lrs} must be > 0 and steps {steps} >= 1.")
    batch_size, context_size = setup.options["batch_size"], setup.runner_cfg.context_size
    runner_cfg = setup.runner_cfg
    # the longest cell's tokens, after every sequence the MSE phase read; shorter cells take their first part
    kl_data, _ = kl_phase_sequences(
        runner_cfg,
        setup.model,
        setup.train_data,
        runner_cfg.training_tokens,
        max(steps) * batch_size * context_size,
        setup.recipe.b_dec_init,
    )
    before = setup.evaluator(mse_sae)
    cells = []
    for lr in lrs:
        for n_steps in steps:
            tokens = n_steps * batch_size * context_size
            afters, seconds = kl_and_control(
                setup,
                mse_sae,
                kl_data[: n_steps * batch_size],
                out / f"lr{lr:g}_steps{n_steps}",
                overwrite=overwrite,
                lr=lr,
            )
            intervals = paired_intervals(before, afters, control="MSE-only")
            cells.append(
                {
                    "lr": lr,
                    "steps": n_steps,
                    "kl_tokens": tokens,
                    "kl_share_of_run": tokens / (runner_cfg.training_tokens + tokens),
                    **{
                        arm: {
                            "fraction_ce_gap_closed": fraction_closed(before, after),
                            "interval": intervals["fraction_ce_gap_closed"][arm],
                            "ce_gap": after.ce_gap,
                            "mse": after.mse,
                            "dead_latents": after.dead_latents,
                            "wall_seconds": seconds[arm],
                        }
                        for arm, after in afters.items()
                    },
                    "difference_interval": intervals["difference_from_control"]["KL+MSE"],
                }
            )
            closed = [cells[-1][arm]["fraction_ce_gap_closed"] for arm in ARMS]
            cells[-1]["difference"] = None if None in closed else closed[0] - closed[1]
            print(_cell_line(cells[-1]))
    result = {
        "before": {k: v for k, v in before.to_dict().items() if k != "downstream_mse"},
        "settings": {
            "model": setup.model.cfg.model_name,
            "hook": runner_cfg.hook_name,
            "sae": {"architecture": runner_cfg.sae.architecture(), "d_sae": runner_cfg.sae.d_sae},
            "k": getattr(runner_cfg.sae, "k", None),
            "mse_phase_tokens": runner_cfg.training_tokens,
            "batch": f"{batch_size} x {context_size} tokens",
            "held_out_sequences": intervals["n_sequences"],
            "held_out_split": setup.eval_split,
            "kl_optimizer": "continued" if setup.options.get("continue_optimizer_from") else "fresh",
        },
        "cells": cells,
    }
    write_file(out / "sweep.json", json.dumps(result, indent=2))
    write_file(out / "sweep.md", _markdown(result))
    _figure(result, out / "sweep.png")
    return result


def kl_and_control(
    setup: Any, mse_sae: SAE[Any], kl_data: torch.Tensor, folder: Path, *, overwrite: bool, **options: Any
) -> tuple[dict[str, EvalResult], dict[str, float]]:
    """KL+MSE and its MSE-only control from `mse_sae` on the sequences `kl_data`, saved under
    `folder`, with the demo setup's options (`options` override them): each arm's held-out result
    from the shared evaluator, and its wall seconds."""
    afters, seconds = {}, {}
    for arm, loss in ARMS.items():
        started = time.perf_counter()
        kl_finetune(
            mse_sae,
            setup.model,
            kl_data,
            tokens=kl_data.numel(),
            loss=loss,
            save_dir=folder / loss.replace("+", "_"),
            overwrite=overwrite,
            evaluator=setup.evaluator,
            **{**setup.options, **options},
        )
        seconds[arm] = time.perf_counter() - started
        afters[arm] = setup.evaluator.last
    return afters, seconds


def _cell_line(cell: dict[str, Any]) -> str:
    kl, mse, diff = cell["KL+MSE"], cell["MSE-only"], cell["difference_interval"]
    return (
        f"lr {cell['lr']:g} x {cell['steps']} steps: KL+MSE {_pct(kl['fraction_ce_gap_closed'])}, "
        f"MSE-only {_pct(mse['fraction_ce_gap_closed'])}, difference {_pct(cell['difference'])} "
        f"{format_interval(diff)}"
    )


def _pct(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.1%}"


def _markdown(result: dict[str, Any]) -> str:
    settings, before = result["settings"], result["before"]
    lines = [
        "# KL phase sweep: KL+MSE vs its MSE-only control per lr x steps",
        "",
        f"{settings['model']} at {settings['hook']}; {settings['sae']['architecture']} k={settings['k']}, "
        f"d_sae {settings['sae']['d_sae']}, MSE phase {settings['mse_phase_tokens']:,} tokens; batches of "
        f"{settings['batch']}. Starting SAE: CE gap {before['ce_gap']:.4f}, explained variance "
        f"{before['explained_variance']:.3f}, {before['dead_latents']} dead latents. Intervals: 95 % paired "
        f"bootstrap over {settings['held_out_sequences']} held-out sequences ({settings['held_out_split']} "
        f"split). KL-phase Adam: {settings['kl_optimizer']}.",
        "",
        "| lr | steps | KL share of run | KL+MSE closed [95 %] | MSE-only closed [95 %] | difference [95 %] "
        "| dead after (KL+MSE / MSE) | MSE after (KL+MSE / MSE) | s (KL+MSE / MSE) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in result["cells"]:
        kl, mse = cell["KL+MSE"], cell["MSE-only"]
        lines.append(
            f"| {cell['lr']:g} | {cell['steps']} | {cell['kl_share_of_run']:.1%} "
            f"| {_pct(kl['fraction_ce_gap_closed'])} {format_interval(kl['interval'])} "
            f"| {_pct(mse['fraction_ce_gap_closed'])} {format_interval(mse['interval'])} "
            f"| {_pct(cell['difference'])} {format_interval(cell['difference_interval'])} "
            f"| {kl['dead_latents']} / {mse['dead_latents']} "
            f"| {kl['mse']:,.0f} / {mse['mse']:,.0f} | {kl['wall_seconds']:.0f} / {mse['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _figure(result: dict[str, Any], path: Path) -> None:
    lrs = sorted({cell["lr"] for cell in result["cells"]})
    fig = Figure(figsize=(4.2 * len(lrs), 3.4))
    axes = fig.subplots(1, len(lrs), squeeze=False)[0]
    for axis, lr in zip(axes, lrs, strict=True):
        cells = [cell for cell in result["cells"] if cell["lr"] == lr]
        for offset, (arm, color) in enumerate((("KL+MSE", "C0"), ("MSE-only", "C1"))):
            xs = [cell["steps"] * (1 + 0.03 * offset) for cell in cells]
            values = [cell[arm]["fraction_ce_gap_closed"] or 0.0 for cell in cells]
            errors = error_bars(values, [cell[arm]["interval"] for cell in cells])
            axis.errorbar(xs, values, yerr=errors, marker="o", capsize=3, color=color, label=arm)
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.set_xscale("log", base=2)
        axis.set_title(f"lr {lr:g}")
        axis.set_xlabel("KL-phase steps")
    axes[0].set_ylabel("CE gap closed (95 % interval)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
