"""The paper's Fig. 2 in miniature: across TopK sparsities k, the demo's MSE phase followed by a
short KL+MSE phase (5 % of the run's tokens by default) against its MSE-only control on the same
tokens, and optionally against end-to-end KL+MSE training on all of the run's tokens; each k's CE
gap on the same held-out sequences, the fractions closed with paired 95 % intervals, wall-clock
(`sae-lens-kl sparsity`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sae_lens_kl.intervals import error_bars, format_interval, fraction_closed, paired_intervals
from sae_lens_kl.report import save_figure
from sae_lens_kl.staging import write_file
from sae_lens_kl.sweep import kl_and_control
from sae_lens_kl.train import kl_phase_sequences, train_with_kl_phase

ARMS = ("KL+MSE", "MSE-only", "end to end")


def kl_phase_tokens(setup: Any, kl_share: float) -> int:
    """The KL phase's tokens: `kl_share` of the run (MSE phase + KL phase), whole batches, at least
    one."""
    if not 0 < kl_share < 1:
        raise ValueError(f"kl_share={kl_share} must lie in (0, 1).")
    batch_tokens = setup.options["batch_size"] * setup.runner_cfg.context_size
    mse_tokens = setup.runner_cfg.training_tokens
    wanted = mse_tokens * kl_share / (1 - kl_share)
    return max(1, round(wanted / batch_tokens)) * batch_tokens


def run_sparsity_sweep(
    setup: Any,
    ks: list[int],
    out: Path,
    *,
    overwrite: bool,
    kl_share: float = 0.05,
    end_to_end: bool = False,
    mse_sae_for_k: Any,
) -> dict[str, Any]:
    """Every k on the demo `setup` (commands.demo.DemoSetup); `mse_sae_for_k(k)` gives (the cached
    MSE-phase SAE, seconds it took to train or None when read from the cache). Writes
    sparsity.json, sparsity.md and sparsity.png in `out`."""
    if setup.evaluator is None:
        raise ValueError("The sparsity sweep compares held-out CE gaps: pass --eval-tokens > 0.")
    kl_tokens = kl_phase_tokens(setup, kl_share)
    rows = []
    for k in ks:
        runner_cfg = setup.runner_config_for("topk", k=k)
        mse_sae, mse_seconds = mse_sae_for_k(k)
        kl_data, _ = kl_phase_sequences(
            runner_cfg,
            setup.model,
            setup.train_data,
            runner_cfg.training_tokens,
            kl_tokens,
            setup.recipe.b_dec_init,
        )
        print(f"k={k}: KL+MSE and the MSE-only control")
        afters, arm_seconds = kl_and_control(setup, mse_sae, kl_data, out / f"k{k}", overwrite=overwrite)
        seconds = {"MSE phase": mse_seconds, **arm_seconds}
        if end_to_end:
            print(f"k={k}: end to end on {runner_cfg.training_tokens + kl_tokens:,} tokens")
            started = time.perf_counter()
            total_cfg = setup.runner_config_for("topk", runner_cfg.training_tokens + kl_tokens, k=k)
            train_with_kl_phase(
                total_cfg,
                setup.model,
                setup.train_data,
                kl_fraction=1.0,
                save_dir=out / f"k{k}" / "end_to_end",
                overwrite=overwrite,
                evaluator=setup.evaluator,
                # the MSE phase's lr (decaying as its own) and batches: training from scratch
                **{
                    **setup.options,
                    "lr": total_cfg.lr,
                    "batch_size": total_cfg.train_batch_size_tokens // total_cfg.context_size,
                },
            )
            seconds["end to end"] = time.perf_counter() - started
            afters["end to end"] = setup.evaluator.last
        before = setup.evaluator(mse_sae)
        intervals = paired_intervals(before, afters, control="MSE-only")
        rows.append(
            {
                "k": k,
                "ce_gap_mse_phase": before.ce_gap,
                "explained_variance_mse_phase": before.explained_variance,
                "dead_latents_mse_phase": before.dead_latents,
                "arms": {
                    arm: {
                        "ce_gap": after.ce_gap,
                        "fraction_ce_gap_closed": fraction_closed(before, after),
                        "interval": intervals["fraction_ce_gap_closed"][arm],
                        "difference_from_mse_only": intervals["difference_from_control"].get(arm),
                        "dead_latents": after.dead_latents,
                        "explained_variance": after.explained_variance,
                    }
                    for arm, after in afters.items()
                },
                "seconds": seconds,
            }
        )
        print(_row_line(rows[-1]))
    result = {
        "settings": {
            "model": setup.model.cfg.model_name,
            "hook": setup.runner_cfg.hook_name,
            "d_sae": setup.runner_cfg.sae.d_sae,
            "mse_phase_tokens": setup.runner_cfg.training_tokens,
            "kl_tokens": kl_tokens,
            "kl_share_of_run": kl_tokens / (setup.runner_cfg.training_tokens + kl_tokens),
            "kl_lr": setup.options["lr"],
            "batch": f"{setup.options['batch_size']} x {setup.runner_cfg.context_size} tokens",
            "held_out_sequences": setup.evaluator.n_sequences,
            "end_to_end": end_to_end,
        },
        "rows": rows,
    }
    write_file(out / "sparsity.json", json.dumps(result, indent=2))
    write_file(out / "sparsity.md", _markdown(result))
    _figure(result, out / "sparsity.png")
    return result


def _pct(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.1%}"


def _row_line(row: dict[str, Any]) -> str:
    arms = ", ".join(
        f"{arm} {_pct(values['fraction_ce_gap_closed'])} {format_interval(values['interval'])}"
        for arm, values in row["arms"].items()
    )
    return f"k={row['k']}: CE gap after the MSE phase {row['ce_gap_mse_phase']:.4f}; closed: {arms}"


def _seconds(value: float | None) -> str:
    return "cached" if value is None else f"{value:.0f}"


def _markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    arms = [arm for arm in ARMS if any(arm in row["arms"] for row in result["rows"])]
    lines = [
        "# Sparsity sweep: a short KL+MSE phase vs its MSE-only control"
        + (" vs end-to-end training" if settings["end_to_end"] else "")
        + " per TopK k",
        "",
        f"{settings['model']} at {settings['hook']}, d_sae {settings['d_sae']}; MSE phase "
        f"{settings['mse_phase_tokens']:,} tokens (SAELens's runner), then {settings['kl_tokens']:,} "
        f"tokens ({settings['kl_share_of_run']:.1%} of the run) of KL+MSE or MSE-only at lr "
        f"{settings['kl_lr']:g}, batches of {settings['batch']}"
        + (
            "; end to end: KL+MSE from SAELens's initialisation on all the run's tokens at the MSE "
            "phase's lr and batches"
            if settings["end_to_end"]
            else ""
        )
        + f". Fractions of the MSE-phase SAE's CE gap closed, 95 % paired bootstrap over "
        f"{settings['held_out_sequences']} held-out sequences; 'minus MSE-only' is the paired "
        "difference from the control.",
        "",
        "| k | CE gap after MSE phase | EV / dead |"
        + "".join(f" {arm}: CE gap, closed [95 %] |" for arm in arms)
        + " KL+MSE minus MSE-only [95 %] |"
        + "".join(f" {name} s |" for name in ("MSE phase", *arms)),
        "|---" * (4 + len(arms) + 1 + len(arms)) + "|",
    ]
    for row in result["rows"]:
        cells = [
            f"{row['k']}",
            f"{row['ce_gap_mse_phase']:.4f}",
            f"{row['explained_variance_mse_phase']:.3f} / {row['dead_latents_mse_phase']}",
        ]
        for arm in arms:
            values = row["arms"].get(arm)
            cells.append(
                ""
                if values is None
                else f"{values['ce_gap']:.4f}, {_pct(values['fraction_ce_gap_closed'])} "
                f"{format_interval(values['interval'])}"
            )
        cells.append(format_interval(row["arms"]["KL+MSE"]["difference_from_mse_only"]))
        cells += [_seconds(row["seconds"].get(name)) for name in ("MSE phase", *arms)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    ks = [row["k"] for row in rows]
    fig = Figure(figsize=(9, 3.6))
    gaps, closed = fig.subplots(1, 2)
    gaps.plot(ks, [row["ce_gap_mse_phase"] for row in rows], marker="o", color="grey", label="MSE phase")
    for offset, (arm, color) in enumerate(zip(ARMS, ("C0", "C1", "C2"), strict=True)):
        present = [row for row in rows if arm in row["arms"]]
        if not present:
            continue
        xs = [row["k"] * (1 + 0.03 * offset) for row in present]
        gaps.plot(xs, [row["arms"][arm]["ce_gap"] for row in present], marker="o", color=color, label=arm)
        values = [row["arms"][arm]["fraction_ce_gap_closed"] or 0.0 for row in present]
        errors = error_bars(values, [row["arms"][arm]["interval"] for row in present])
        closed.errorbar(xs, values, yerr=errors, marker="o", capsize=3, color=color, label=arm)
    for axis in (gaps, closed):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_xlabel("TopK k")
    gaps.set_ylabel("held-out CE gap (nats/token)")
    gaps.legend(fontsize=8)
    closed.axhline(0, color="grey", linewidth=0.5)
    closed.set_ylabel("CE gap closed (95 % interval)")
    fig.tight_layout()
    save_figure(fig, path)
