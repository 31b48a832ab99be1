"""The ReLU (L1) SAE the demo's MSE recipe makes, by L1 coefficient: the start of experiment E's
ReLU arm at the demo's sparsity (L0 near the TopK SAE's k=32).

At SAELens's default `l1_coefficient` (1.0) the demo's earlier MSE recipes left SAELens's
standard SAE dense (L0 ~1,000 of 4,608); the recipe's coefficient (`MSERecipe.l1_coefficient`, 20) was chosen
from this script's numbers. It trains the recipe's MSE phase (SAELens's runner, the demo's tokens;
cached in the demo's MSE-phase cache, keyed by the coefficient) at each coefficient given and
evaluates each SAE on the first --eval-tokens of Django's held-out text.

    python benchmarks/relu_l1.py --threads 2 --l1 5,20

Prints one JSON object: per coefficient, the MSE phase's wall time (None when read from the
cache), L0, latents never active on the evaluated tokens, explained variance, CE gap and MSE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from sae_lens_kl.commands.demo import cached_mse_sae
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.evaluation import HeldOutEvaluator
from sae_lens_kl.models import load_model
from sae_lens_kl.recipes import DEMO_HOOK, DEMO_MSE_RECIPE


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--l1", default="5,20", help="l1_coefficient values, comma-separated.")
    parser.add_argument("--eval-tokens", type=int, default=4_096)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("smollm2")
    corpus = django_docs()
    recipe = dataclasses.replace(DEMO_MSE_RECIPE, architecture="standard")
    base_cfg = recipe.runner_config(model, DEMO_HOOK, dataset_name=str(corpus.train))
    evaluator = HeldOutEvaluator.for_data(
        model,
        corpus.eval,
        n_tokens=args.eval_tokens,
        context_size=recipe.context_size,
        batch_size=8,
        exclude_first_positions=recipe.sink_positions,
    )
    rows: dict[str, dict[str, object]] = {}
    for coefficient in (float(c) for c in args.l1.split(",")):
        cfg = dataclasses.replace(base_cfg, sae=dataclasses.replace(base_cfg.sae, l1_coefficient=coefficient))
        start = time.perf_counter()
        sae, cached = cached_mse_sae(cfg, model, corpus.train, recipe.b_dec_init)
        seconds = None if cached else round(time.perf_counter() - start)
        result = evaluator(sae)
        rows[f"l1_coefficient={coefficient:g}"] = {
            "mse_phase_seconds": seconds,
            "l0": round(result.l0, 1),
            "latents_never_active": result.dead_latents,
            "explained_variance": round(result.explained_variance, 4),
            "ce_gap": round(result.ce_gap, 4),
            "mse": round(result.mse, 1),
        }
    print(
        json.dumps(
            {"threads": torch.get_num_threads(), "eval_tokens": args.eval_tokens, "runs": rows}, indent=1
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
