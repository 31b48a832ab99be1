"""The demo's MSE-phase recipe, measured: train the demo's TopK SAE with SAELens's runner under
given settings and print its held-out quality before any KL phase (explained variance, dead
latents, CE gap), so the recipe the demo uses is a measured choice.

    python benchmarks/demo_recipe.py --threads 2 --k 32 --tokens 184320 --lr 2e-3
    python benchmarks/demo_recipe.py --threads 2 --k 64 --tokens 368640 --lr-decay 0.2
    python benchmarks/demo_recipe.py --threads 2 --model gemma3-270m --normalize expected_average_only_in

Each run prints one JSON line: the settings, the wall time and the held-out metrics on the same
tokens the demo evaluates on (Django's held-out docs files, first 2 positions left out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from sae_lens_kl.commands.demo import cached_mse_sae
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.evaluation import evaluate
from sae_lens_kl.models import load_model
from sae_lens_kl.recipes import DEMO_HOOK, DEMO_MSE_RECIPE, DEMO_SIZES
from sae_lens_kl.train import mse_phase


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    recipe = DEMO_MSE_RECIPE  # every default is the demo's
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="smollm2", help="smollm2 or gemma3-270m (offline).")
    parser.add_argument("--hook", default=DEMO_HOOK)
    parser.add_argument(
        "--normalize",
        default=recipe.normalize_activations,
        choices=("none", "expected_average_only_in"),
        help="SAELens's normalize_activations in the MSE phase.",
    )
    parser.add_argument("--d-sae", type=int, default=recipe.d_sae)
    parser.add_argument("--k", type=int, default=int(recipe.k))
    parser.add_argument("--tokens", type=int, default=recipe.tokens)
    parser.add_argument("--lr", type=float, default=recipe.lr)
    parser.add_argument("--batch-tokens", type=int, default=recipe.batch_tokens)
    parser.add_argument(
        "--lr-decay",
        type=float,
        default=recipe.lr_decay_fraction,
        help="Fraction of steps decayed to 0 at the end.",
    )
    parser.add_argument("--warm-up", type=float, default=0.0, help="Fraction of steps of linear warm-up.")
    parser.add_argument("--dead-window", type=int, default=None, help="Steps (default: 5 %% of the run).")
    parser.add_argument("--eval-tokens", type=int, default=DEMO_SIZES["eval_tokens"])
    parser.add_argument(
        "--b-dec-init", default="zeros", choices=("zeros", "mean"), help="The decoder bias's start."
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="Keep the SAE in the demo's MSE-phase cache (where `sae-lens-kl demo` with the same "
        "settings finds it; a cached one is read instead of trained).",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    corpus = django_docs()
    recipe = dataclasses.replace(
        recipe,
        d_sae=args.d_sae,
        k=args.k,
        tokens=args.tokens,
        lr=args.lr,
        batch_tokens=args.batch_tokens,
        lr_decay_fraction=args.lr_decay,
        dead_feature_window=args.dead_window,
        normalize_activations=args.normalize,
    )
    cfg = recipe.runner_config(model, args.hook, dataset_name=str(corpus.train))
    steps = args.tokens // args.batch_tokens
    # SAELens's warm-up is in steps; the recipe has none
    cfg = dataclasses.replace(cfg, lr_warm_up_steps=round(steps * args.warm_up))
    start = time.perf_counter()
    cached = False
    if args.cache:
        sae, cached = cached_mse_sae(cfg, model, corpus.train, args.b_dec_init)
    else:
        sae = mse_phase(cfg, model, corpus.train, args.tokens, b_dec_init=args.b_dec_init)
    train_s = time.perf_counter() - start
    result = evaluate(
        sae,
        model,
        corpus.eval,
        n_tokens=args.eval_tokens,
        batch_size=8,
        context_size=recipe.context_size,
        exclude_first_positions=recipe.sink_positions,
    )
    print(
        json.dumps(
            {
                "settings": {k: v for k, v in vars(args).items() if k != "eval_tokens"},
                "threads": torch.get_num_threads(),
                "train_seconds": None if cached else round(train_s),
                "explained_variance": round(result.explained_variance, 4),
                "dead_latents": result.dead_latents,
                "d_sae": args.d_sae,
                "l0": round(result.l0, 2),
                "ce_gap": round(result.ce_gap, 4),
                "mse": round(result.mse, 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
