"""A transcoder at every layer: L separate fine-tunes vs one set per pass ("independent": the
clean pass once, one spliced suffix per transcoder) vs the joint replacement model (one spliced
pass for all), on the same tokens of a small random TransformerLens model. Prints tokens/s of
each and the speed-ups over L separate fine-tunes (issue 25's target: the set >= L/2 x).

    python benchmarks/bench_transcoder_set.py --threads 2 [--layers 6 --d-model 256 --steps 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_kl import kl_finetune


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=args.layers,
            d_model=args.d_model,
            n_heads=args.d_model // 64,
            d_head=64,
            d_mlp=4 * args.d_model,
            d_vocab=args.vocab,
            n_ctx=args.seq,
            act_fn="gelu",
            normalization_type="LN",
        )
    ).eval()
    tokens = torch.randint(
        0, args.vocab, (args.batch * args.steps, args.seq), generator=torch.Generator().manual_seed(1)
    )

    def transcoders() -> list[Transcoder]:
        torch.manual_seed(2)
        return [
            Transcoder(
                TranscoderConfig(
                    d_in=args.d_model,
                    d_sae=args.d_sae,
                    d_out=args.d_model,
                    apply_b_dec_to_input=False,
                    metadata=SAEMetadata(
                        hook_name=f"blocks.{layer}.ln2.hook_normalized",
                        hook_name_out=f"blocks.{layer}.hook_mlp_out",
                        model_name=model.cfg.model_name,
                        context_size=args.seq,
                        prepend_bos=False,
                    ),
                )
            )
            for layer in range(args.layers)
        ]

    options = {
        "tokens": args.batch * args.steps * args.seq,
        "batch_size": args.batch,
        "eval_tokens": 0,
        "lr": 1e-4,
    }
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for one in transcoders():
        kl_finetune(one, model, tokens, **options)
    seconds["separate"] = time.perf_counter() - started
    for mode in ("independent", "joint"):
        started = time.perf_counter()
        kl_finetune(transcoders(), model, tokens, replacement=mode, **options)
        seconds[mode] = time.perf_counter() - started
    n_tokens = options["tokens"]
    print(
        json.dumps(
            {
                "cpu": _cpu_model(),
                "threads": torch.get_num_threads(),
                "shape": {
                    k: getattr(args, k)
                    for k in ("layers", "d_model", "vocab", "d_sae", "seq", "batch", "steps")
                },
                "tokens_per_second": {name: round(n_tokens / s, 1) for name, s in seconds.items()},
                "speedup_over_separate": {
                    name: round(seconds["separate"] / s, 2)
                    for name, s in seconds.items()
                    if name != "separate"
                },
                "target_speedup": args.layers / 2,
            }
        )
    )


def _cpu_model() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()  # noqa: SIM115 (read once)
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


if __name__ == "__main__":
    main()
