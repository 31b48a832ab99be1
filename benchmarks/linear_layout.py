"""What `splice.linear_layout` saves: TransformerLens 3.9.0 copies every gated-MLP weight and the
attention's W_Q/K/V/O into another layout at every forward; inside `linear_layout` those copies
are views. Measured on the demo's model (the offline SmolLM2-135M) at the demo's KL batch (2 x 128
tokens, random token ids: speed does not depend on them), the two passes of an online KL step
that run the LM's blocks: the clean forward to the final norm (no grad; the logits are
VocabProjection's, untouched) and the spliced suffix from the SAE's block, forward and backward
to the activation (the LM frozen). Each pass alternates the usual layout and `linear_layout`
after a warm-up (median of --repeats), on two copies of the model, one held in `linear_layout`
throughout as a fine-tune holds it; outputs and gradients are first checked bit for bit (the
script exits if they differ).

    python benchmarks/linear_layout.py --threads 2
    python benchmarks/linear_layout.py --threads 2 --batch 8    # the demo's batch before December 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformer_lens import HookedTransformer

from sae_lens_kl.models import load_model
from sae_lens_kl.recipes import DEMO_HOOK
from sae_lens_kl.splice import HookSite, frozen, linear_layout, run_prefix, run_to_output


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # two copies of the model, one held in linear_layout throughout: entering it allocates the
    # weights anew, and their first use page-faults them in (a fine-tune enters it once)
    model, relaid_model = load_model("smollm2"), load_model("smollm2")
    site = HookSite.for_model(model, DEMO_HOOK, None)
    tokens = torch.randint(
        0, model.cfg.d_vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        prefix = run_prefix(model, tokens, site)
        acts = run_to_output(model, tokens, prefix, site)[1]

    def clean(lm: HookedTransformer) -> torch.Tensor:  # the fine-tune's clean pass: to the final norm
        with torch.no_grad():
            return run_to_output(lm, tokens, run_prefix(lm, tokens, site), site)[0]

    def spliced(lm: HookedTransformer) -> torch.Tensor:
        replaced = acts.clone().requires_grad_(True)
        output = run_to_output(lm, tokens, prefix, site, lambda _: replaced)[0]
        output.square().mean().backward()
        assert replaced.grad is not None
        return torch.cat([output.detach().flatten(), replaced.grad.flatten()])

    passes: dict[str, Callable[[HookedTransformer], torch.Tensor]] = {
        "clean forward": clean,
        "spliced suffix fwd+bwd": spliced,
    }
    started = time.perf_counter()
    with linear_layout(model):
        entered = time.perf_counter() - started
    layout_seconds = time.perf_counter() - started
    with frozen(model), frozen(relaid_model), linear_layout(relaid_model):
        for name, run in passes.items():
            if not torch.equal(run(model), run(relaid_model)):
                raise SystemExit(f"{name}: linear_layout changed the result")
        print(
            f"SmolLM2-135M, {args.batch} x {args.seq} tokens, SAE site {DEMO_HOOK}, "
            f"threads {torch.get_num_threads()}"
        )
        print("| pass | usual layout ms | linear_layout ms | saved |")
        print("|---|---|---|---|")
        for name, run in passes.items():
            times: dict[bool, list[float]] = {False: [], True: []}
            for repeat in range(args.repeats + 1):
                for relaid in (False, True):
                    started = time.perf_counter()
                    run(relaid_model if relaid else model)
                    if repeat:  # the first round warms up
                        times[relaid].append(time.perf_counter() - started)
            usual_ms, relaid_ms = (1000 * statistics.median(times[r]) for r in (False, True))
            print(f"| {name} | {usual_ms:.0f} | {relaid_ms:.0f} | {1 - relaid_ms / usual_ms:.1%} |")
    print(
        "entering and leaving linear_layout (once per fine-tune, evaluation or cache build): "
        f"{layout_seconds:.2f} s (entering {entered:.2f} s)"
    )


if __name__ == "__main__":
    main()
