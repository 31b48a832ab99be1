"""The paper's comparisons as recipes (Karvonen 2025, App. B-D, H, Fig. 3; Braun et al. 2024,
Fig. 1): each experiment is a table of arms, each arm a sequence of `kl_finetune` stages (or a
training run from scratch) started from the demo's MSE-phase SAE on the demo's tokens. Every arm
goes through the same splice and step and saves SAELens artifacts; the experiment writes one
JSON result, a Markdown table and a PNG figure.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sae_lens_kl.api import kl_finetune
from sae_lens_kl.eval_result import EvalResult
from sae_lens_kl.experiment_report import experiment_figure, experiment_markdown
from sae_lens_kl.intervals import (
    fraction_closed,
    mean_fraction_closed,
    paired_intervals,
)
from sae_lens_kl.lm_lora import lm_lora_targets
from sae_lens_kl.staging import write_file
from sae_lens_kl.train import kl_phase_sequences, train_with_kl_phase
from sae_lens_kl.trainer import StepCallback


@dataclasses.dataclass(frozen=True)
class Arm:
    """One method under comparison."""

    name: str
    stages: tuple[dict[str, Any], ...] = ({},)
    """`kl_finetune` options of each stage, run one after the other on the same KL tokens."""
    start: str = "topk"
    """Architecture of the MSE-phase SAE the arm starts from."""
    kl_fraction: float | None = None
    """Train from scratch instead: MSE for (1 - kl_fraction) of the MSE phase's + the KL phase's
    tokens, then the first stage's objective on the rest (1.0: end to end)."""
    one_optimizer: bool = False
    """With `kl_fraction`: the paper's A.1 recipe, one constant lr (the MSE phase's, no final decay)
    and one Adam carried from the MSE phase into the KL phase, instead of the MSE phase's decaying lr
    and a fresh Adam (with its own decaying lr) for the KL phase."""
    split_budget: bool = False
    """The stages share the KL tokens (stage i trains on the i-th equal part) instead of each
    training on all of them: a two-stage arm at the same budget as the others (the paper's code
    switches from the SAE to the adapter halfway)."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    title: str
    paper: str
    """What the paper found, to read the result against."""
    arms: tuple[Arm, ...]
    reference: str | None = None
    """The arm every other arm of its start is compared with (a paired difference); None: the
    first (the paper's method)."""


EXPERIMENTS: dict[str, Experiment] = {
    "A": Experiment(
        "App. B: KL+MSE vs the MSE-only continuation vs KL-only, on the same tokens",
        "KL-only closes about as much of the CE gap as KL+MSE, with a much worse MSE; an MSE-only "
        "continuation closes little.",
        (Arm("KL+MSE"), Arm("MSE-only", ({"loss": "mse"},)), Arm("KL-only", ({"loss": "kl"},))),
    ),
    "B": Experiment(
        "App. C: SAE fine-tune vs adapters after the SAE (SAE frozen) vs two-stage",
        "Adapters recover about 60 % of the fine-tune's gain; fine-tune then adapter does not stack.",
        (
            Arm("SAE fine-tune"),
            Arm("linear adapter", ({"adapter": "linear"},)),
            Arm("MLP adapter", ({"adapter": "mlp"},)),
            Arm(
                "two-stage: fine-tune, then linear adapter (half the tokens each)",
                ({}, {"adapter": "linear"}),
                split_budget=True,
            ),
        ),
    ),
    "C": Experiment(
        "App. D: full fine-tune vs LoRA on the SAE (merged back into a plain SAE)",
        "Rank 2 recovers more than 50 % of the full fine-tune's gain.",
        (
            Arm("full fine-tune"),
            Arm("LoRA on the SAE, rank 2", ({"sae_lora_rank": 2},)),
            Arm("LoRA on the SAE, rank 64", ({"sae_lora_rank": 64},)),
        ),
    ),
    "D": Experiment(
        "Fig. 3: SAE fine-tune (KL+MSE) vs LoRA on the LM after the SAE or on all layers (SAE frozen, "
        "KL loss, Chen et al.'s)",
        "The SAE fine-tune is slightly better than LoRA on the whole model; LoRA on the layers after "
        "the SAE only is much weaker.",
        (
            Arm("SAE fine-tune (KL+MSE)"),
            Arm("LoRA on the LM after the SAE, rank 16 (KL)", ({"lm_lora_rank": 16, "loss": "kl"},)),
            Arm(
                "LoRA on all LM layers, rank 16 (KL)",
                ({"lm_lora_rank": 16, "lm_lora_layers": "all", "loss": "kl"},),
            ),
        ),
    ),
    "E": Experiment(
        "App. H: weight stability (cosine of each latent's encoder/decoder vector, before vs after)",
        "Latents stay close to where they started; for TopK SAEs the decoder moves more than the encoder.",
        (Arm("TopK", start="topk"), Arm("ReLU (L1, controller on)", start="standard")),
    ),
    "F": Experiment(
        "Fig. 1 (Braun et al.) with App. A.1's optimizer: end to end vs MSE then a 5 % KL+MSE phase "
        "vs e2e+ds, equal total tokens, the same batches and one constant lr (the MSE phase's) for "
        "every arm, one Adam across the two phases",
        "The short KL+MSE fine-tune at the end of MSE training matches or exceeds full end-to-end "
        "training on CE at about half the wall-clock time.",
        (
            Arm("MSE, then 5 % KL+MSE", kl_fraction=0.05, one_optimizer=True),
            Arm("end to end, KL+MSE", kl_fraction=1.0, one_optimizer=True),
            Arm(
                "end to end, e2e+ds",
                ({"loss": "e2e+ds", "kl_coefficient": 0.5},),
                kl_fraction=1.0,
                one_optimizer=True,
            ),
        ),
    ),
}


def run_experiment(
    name: str,
    setup: Any,
    mse_sae_for: Any,
    out: Path,
    *,
    overwrite: bool,
    seeds: int = 1,
    experiment: Experiment | None = None,
    callbacks: Mapping[str, Sequence[StepCallback]] | None = None,
    start_sae: str | None = None,
) -> dict[str, Any]:
    """Run every arm of experiment `name` on the demo `setup` (commands.demo.DemoSetup), `seeds` times;
    `mse_sae_for(architecture, tokens=None, seed=0)` gives the cached MSE-phase SAE. Seed s trains
    every fine-tune arm on the s-th block of KL-phase tokens after every sequence the MSE phase reads, with
    `init_seed=s` (LoRA and adapter initialisation); arms trained from scratch also seed their MSE
    phase's initialisation and shuffling with it. Writes experiment.json/.md/.png in `out`.
    `experiment`: run this one under `name` instead of EXPERIMENTS[name] (the demo's);
    `callbacks`: by arm name, step callbacks of its fine-tunes; `start_sae`: where the MSE-phase
    SAE the arms start from is saved (recorded in their reports)."""
    experiment = experiment or EXPERIMENTS[name]
    rows, reports, afters = [], {}, {}
    for arm in experiment.arms:
        seed_rows, afters[arm.name], reports[arm.name] = [], [], []
        for seed in range(seeds):
            print(f"[{name}] {arm.name}" + (f", seed {seed}" if seeds > 1 else ""))
            folder = out / _slug(arm.name) / (f"seed_{seed}" if seeds > 1 else "")
            started = time.perf_counter()
            arm_reports = _run_arm(
                arm,
                setup,
                mse_sae_for,
                folder,
                overwrite,
                seed,
                {"callbacks": (callbacks or {}).get(arm.name, ()), "start_sae": start_sae},
            )
            seed_rows.append(_row(arm.name, arm_reports, time.perf_counter() - started))
            reports[arm.name].append(arm_reports)
            # the arm's result as its last stage evaluated it (with LoRA on the LM or an adapter)
            if setup.evaluator is not None:
                afters[arm.name].append(setup.evaluator.last)
        rows.append(_mean_row(seed_rows))
    intervals = (
        None if setup.evaluator is None else _add_intervals(experiment, rows, afters, setup, mse_sae_for)
    )
    result = {
        "experiment": name,
        "title": experiment.title,
        "paper": experiment.paper,
        "reference_arm": experiment.reference or experiment.arms[0].name,
        "settings": {
            "model": setup.model.cfg.model_name,
            "hook": setup.runner_cfg.hook_name,
            "d_sae": setup.runner_cfg.sae.d_sae,
            "mse_phase_tokens": setup.runner_cfg.training_tokens,
            "kl_tokens": setup.kl_tokens,
            "seeds": seeds,
            "options": setup.options,
            # arms whose stages set only a loss that reads nothing after the SAE's hook train from
            # a clean-pass cache of their tokens (DemoSetup.kl_source; each report names its data)
            "kl_clean_pass_cache": setup.kl_cache,
        },
        "arms": rows,
        # per arm: one list of stage reports per seed
        "reports": reports,
        # by the arms' start: each arm's interval and its paired difference from the reference arm
        "intervals": intervals,
    }
    write_file(out / "experiment.json", json.dumps(result, indent=2))
    write_file(out / "experiment.md", experiment_markdown(result))
    experiment_figure(result, out / "experiment.png")
    return result


def tokens_needed(setup: Any, seeds: int) -> int:
    """Training tokens an experiment reads after every sequence the MSE phase reads: one KL-phase
    block per seed."""
    return seeds * setup.kl_tokens


def _add_intervals(
    experiment: Experiment,
    rows: list[dict[str, Any]],
    afters: Mapping[str, list[EvalResult]],
    setup: Any,
    mse_sae_for: Any,
) -> dict[str, dict[str, Any]]:
    """Each arm's fraction of the CE gap closed against the MSE-phase SAE it starts from (for
    arms trained from scratch: the demo's MSE-phase SAE of their architecture, a common baseline),
    with its 95 % paired bootstrap interval, and each arm's paired difference from the reference
    arm of the same start (the experiment's, else the first: the paper's method), all on the same
    held-out sequences; with several seeds, the mean over seeds and an interval that draws the
    seeds too (intervals.py). Returns the intervals by start."""
    by_start: dict[str, list[str]] = {}
    for arm in experiment.arms:
        by_start.setdefault(arm.start, []).append(arm.name)
    row_of = {row["arm"]: row for row in rows}
    by_start_intervals = {}
    for start, names in by_start.items():
        before = setup.evaluator(mse_sae_for(start))
        runs = {name: afters[name] for name in names}
        reference = experiment.reference if experiment.reference in names else names[0]
        intervals = paired_intervals(before, runs, control=reference if len(runs) > 1 else None)
        by_start_intervals[start] = intervals
        for name, seeds in runs.items():
            row = row_of[name]
            row["ce_gap_before"] = before.ce_gap
            row["fraction_of_ce_gap_closed"] = mean_fraction_closed(before, seeds)
            row["fraction_per_seed"] = [fraction_closed(before, after) for after in seeds]
            row["fraction_interval"] = intervals["fraction_ce_gap_closed"][name]
            if name != reference and "difference_from_control" in intervals:
                row["difference_from_reference"] = intervals["difference_from_control"][name]
    return by_start_intervals


def _run_arm(
    arm: Arm,
    setup: Any,
    mse_sae_for: Any,
    folder: Path,
    overwrite: bool,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The kl_finetune report of each stage, for seed `seed`; `extra`: further options of every
    fine-tune (callbacks, start_sae)."""
    extra = extra or {}
    seeded = {"init_seed": seed}
    if arm.kl_fraction is not None:
        total = setup.runner_cfg.training_tokens + setup.kl_tokens
        runner_cfg = setup.runner_config_for(arm.start, total, seed=seed, constant_lr=arm.one_optimizer)
        # one lr and the same batches as the MSE phase for every arm (Braun et al.'s comparison)
        same_steps = {
            "lr": runner_cfg.lr,
            "batch_size": runner_cfg.train_batch_size_tokens // runner_cfg.context_size,
            **({"lr_schedule": "constant"} if arm.one_optimizer else {}),
        }
        # at least one KL step (a quick run's 5 % can be less than a batch)
        one_step = same_steps["batch_size"] * runner_cfg.context_size
        fraction = max(arm.kl_fraction, one_step / total)
        mse_tokens = total - round(total * fraction)
        # A.1 trains its MSE phase here, so that the KL phase can continue its Adam (not cached)
        continued = arm.one_optimizer and mse_tokens > 0
        result = train_with_kl_phase(
            runner_cfg,
            setup.model,
            setup.train_data,
            kl_fraction=fraction,
            save_dir=folder,
            mse_sae=mse_sae_for(arm.start, mse_tokens, seed=seed) if mse_tokens and not continued else None,
            continue_optimizer=continued,
            overwrite=overwrite,
            callbacks=extra.get("callbacks", ()),
            b_dec_init=setup.recipe.b_dec_init,
            **setup.held_out(),
            **{**setup.options, **same_steps, **seeded, **arm.stages[0]},
        )
        return [result.sae.cfg.metadata.kl_finetune]
    sae = mse_sae_for(arm.start)
    runner_cfg = setup.runner_config_for(arm.start)
    # seed s reads the s-th block of tokens after every sequence the MSE phase read
    kl_data, _ = kl_phase_sequences(
        runner_cfg,
        setup.model,
        setup.train_data,
        runner_cfg.training_tokens,
        setup.kl_tokens,
        setup.recipe.b_dec_init,
        skip_tokens=seed * setup.kl_tokens,
    )
    reports = []
    parts = kl_data.chunk(len(arm.stages)) if arm.split_budget else [kl_data] * len(arm.stages)
    for index, (stage, stage_data) in enumerate(zip(arm.stages, parts, strict=True)):
        options = _fitted({**setup.options, **seeded, **stage}, sae, setup.model)
        sae = kl_finetune(
            sae,
            setup.model,
            setup.kl_source(stage_data, stage),
            tokens=stage_data.numel(),
            **setup.held_out(),
            save_dir=folder if len(arm.stages) == 1 else folder / f"stage_{index + 1}",
            overwrite=overwrite,
            callbacks=extra.get("callbacks", ()),
            # the first stage starts from the MSE-phase SAE, saved where start_sae says
            start_sae=extra.get("start_sae") if index == 0 else None,
            **options,
        )
        reports.append(sae.cfg.metadata.kl_finetune)
    return reports


def _fitted(options: dict[str, Any], sae: Any, model: Any) -> dict[str, Any]:
    """Ranks and widths capped at half of what the SAE and model allow (a tiny test model is
    smaller than the ranks the paper names); each run's config records the value used."""
    if "sae_lora_rank" in options:
        options["sae_lora_rank"] = min(options["sae_lora_rank"], min(sae.cfg.d_in, sae.cfg.d_sae) // 2)
    if options.get("adapter") == "linear":
        options["adapter_width"] = min(options.get("adapter_width", 16), sae.cfg.d_in // 2)
    if "lm_lora_rank" in options:
        targets = lm_lora_targets(model, sae.cfg.metadata.hook_name, options.get("lm_lora_layers", "after"))
        smallest = min(min(t.in_features, t.out_features) for t in targets)
        options["lm_lora_rank"] = min(options["lm_lora_rank"], smallest // 2)
    return options


def _row(name: str, reports: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """An arm's summary: the last stage's 'after' against the first stage's 'before'."""
    first, last = reports[0]["before"], reports[-1]["after"]
    downstream = last["downstream_mse"]
    stability = reports[0].get("weight_stability", {})
    return {
        "arm": name,
        "ce_gap_before": first["ce_gap"],
        "ce_gap": last["ce_gap"],
        "fraction_of_ce_gap_closed": (first["ce_gap"] - last["ce_gap"]) / first["ce_gap"]
        if first["ce_gap"] > 0
        else None,
        "fraction_interval": None,
        "difference_from_reference": None,
        "kl": last["kl"],
        "mse_before": first["mse"],
        "mse": last["mse"],
        "explained_variance": last["explained_variance"],
        "l0": last["l0"],
        "downstream_mse_last": downstream[list(downstream)[-1]] if downstream else None,
        "encoder_cosine_p50": stability.get("encoder", {}).get("p50"),
        "decoder_cosine_p50": stability.get("decoder", {}).get("p50"),
        "train_seconds": sum(report["train_seconds"] for report in reports),
        "wall_seconds": seconds,
    }


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed's row, or the mean over seeds of every number in the rows (seconds summed)."""
    if len(rows) == 1:
        return rows[0]
    mean: dict[str, Any] = {}
    for key, value in rows[0].items():
        values = [row[key] for row in rows]
        if key.endswith("seconds"):
            mean[key] = sum(values)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and None not in values:
            mean[key] = sum(values) / len(values)
        else:
            mean[key] = value
    return mean


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
