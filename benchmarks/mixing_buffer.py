"""The MSE phase's activation shuffling, measured: SAELens's mixing buffer as sae-lens 6.54.12 sizes
it for the settings the demo used before December 5 (n_batches_in_buffer 32) against the buffer
the demo's recipe now asks for (train.MIXING_BUFFER_SEQUENCES).

sae-lens 6.54.12's `LanguageModelSAERunnerConfig` reports `n_tokens_per_buffer` =
store_batch_size_prompts × context_size × n_batches_in_buffer (what its 5.x buffer held), but
`ActivationsStore.get_data_loader` sizes the mixing buffer as n_batches_in_buffer × the training
context (context_size less the left-out positions), store_batch_size_prompts times fewer
(tests/test_sae_lens_seams.py). With 32, every training batch is drawn from the last ~32
sequences read. This trains the demo's MSE phase with each buffer (read from the demo's MSE-phase
cache when there) and evaluates both on the demo's held-out tokens, with a paired bootstrap
interval, over the held-out sequences, of the fraction of the first SAE's CE gap the second closes.

    python benchmarks/mixing_buffer.py --threads 2

Prints one JSON object: per buffer, the activations it mixes, the MSE phase's wall time (None when
read from the cache), explained variance, dead latents, CE gap, MSE; and that interval.
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
from sae_lens_kl.intervals import paired_intervals
from sae_lens_kl.models import load_model
from sae_lens_kl.recipes import DEMO_HOOK, DEMO_MSE_RECIPE, DEMO_SIZES


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--buffer-batches",
        default="32,512",
        help="n_batches_in_buffer values, comma-separated; the first is the reference (default: the "
        "demo's 32 before December 5, and 512 = 32 x 16 prompts, what SAELens's config reports for 32).",
    )
    parser.add_argument("--eval-tokens", type=int, default=DEMO_SIZES["eval_tokens"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("smollm2")
    corpus = django_docs()
    recipe = DEMO_MSE_RECIPE
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
    results = {}
    for batches in (int(b) for b in args.buffer_batches.split(",")):
        cfg = dataclasses.replace(base_cfg, n_batches_in_buffer=batches)
        start = time.perf_counter()
        # the demo's MSE-phase cache (keyed by n_batches_in_buffer): the demo's own SAE for 32
        sae, cached = cached_mse_sae(cfg, model, corpus.train, recipe.b_dec_init)
        seconds = None if cached else round(time.perf_counter() - start)
        result = evaluator(sae)
        name = f"n_batches_in_buffer={batches}"
        results[name] = result
        rows[name] = {
            # what ActivationsStore.get_data_loader passes to mixing_buffer (sae-lens 6.54.12)
            "mixed_activations": batches * len(range(cfg.context_size)[slice(*cfg.seqpos_slice)]),
            "mse_phase_seconds": seconds,
            "explained_variance": round(result.explained_variance, 4),
            "dead_latents": result.dead_latents,
            "ce_gap": round(result.ce_gap, 4),
            "mse": round(result.mse, 1),
        }
    reference, *others = results
    intervals = paired_intervals(results[reference], {name: results[name] for name in others})
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "eval_sequences": intervals["n_sequences"],
                "runs": rows,
                f"fraction of {reference}'s CE gap closed, 95 % interval": intervals[
                    "fraction_ce_gap_closed"
                ],
            },
            indent=1,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
