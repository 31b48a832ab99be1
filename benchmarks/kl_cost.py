"""What the KL phase costs per token against the MSE-only step, measured and as its floor
(issue: performance against the machine's floor, "the KL phase per token <= 3x the MSE phase").

Reads a demo's report.json (`sae-lens-kl demo`: the KL+MSE phase and the MSE-only control train on
the same tokens with the same engine) and counts the floating-point operations per token of each
step at the demo's shape (its model, hook, SAE): the MSE-only step runs the blocks up to the SAE's
hook and the SAE forward and backward; the KL+MSE step also runs the rest of the model clean and
spliced, the three unembedding products of the KL (clean logits, spliced logits, their input
gradient) and the backward through the blocks after the SAE. If both steps ran at the same rate,
their time per token would be in the ratio of their FLOPs: that ratio is the floor of the measured
one without leaving out exact work.

    python benchmarks/kl_cost.py sae_lens_kl_demo            # table

FLOP counts as in benchmarks/roofline.py (2 per multiply-add; elementwise work not counted): a
block's forward is its projections (Q, K, V with grouped heads, O; the MLP, gated or not) plus
4 T n_heads d_head for scores and pattern x values over the T positions TransformerLens forms;
its input-gradient backward the same projections plus twice the attention products (no weight
gradients: the LM is frozen). The TopK SAE: encoder 2 d d_sae, decoder 2 k d, backward 4 k d.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sae_lens import SAE
from transformer_lens import HookedTransformerConfig

from sae_lens_kl.models import load_model


def block_flops(cfg: HookedTransformerConfig, seq: int) -> tuple[float, float]:
    """(forward, input-gradient backward) FLOPs of one block per token."""
    d, heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head
    kv_heads = cfg.n_key_value_heads or heads
    projections = 2 * d * heads * d_head * 2 + 2 * d * kv_heads * d_head * 2
    mlp = (3 if cfg.gated_mlp else 2) * 2 * d * (cfg.d_mlp or 4 * d)
    attention = 4 * seq * heads * d_head
    return projections + mlp + attention, projections + mlp + 2 * attention


def step_flops(cfg: HookedTransformerConfig, hook: str, d_sae: int, k: int, seq: int) -> dict[str, float]:
    """FLOPs per token of the MSE-only and the KL+MSE step, by part."""
    match = re.match(r"blocks\.(\d+)\.hook_resid_(pre|post)$", hook)
    if match is None:
        raise SystemExit(f"kl_cost counts residual-stream hooks (blocks.N.hook_resid_pre/post), not {hook}")
    before = int(match.group(1)) + (match.group(2) == "post")
    after = cfg.n_layers - before
    forward, backward = block_flops(cfg, seq)
    sae = 2 * cfg.d_model * d_sae + 2 * k * cfg.d_model + 4 * k * cfg.d_model
    unembed = 2 * cfg.d_model * cfg.d_vocab
    mse = {"blocks before the SAE": before * forward, "SAE forward and backward": sae}
    kl = {
        **mse,
        "clean and spliced blocks after it": 2 * after * forward,
        "three unembedding products": 3 * unembed,
        "backward through the blocks after it": after * backward,
    }
    return {"mse": sum(mse.values()), "kl": sum(kl.values()), **{f"kl: {name}": v for name, v in kl.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("demo", type=Path, help="the demo's output folder (report.json, kl_mse/)")
    parser.add_argument("--model", default="smollm2", help="the demo's --model (default: smollm2)")
    args = parser.parse_args()
    report = json.loads((args.demo / "report.json").read_text())
    kl_run, mse_run = report["runs"]["KL+MSE"], report["runs"]["MSE-only control"]
    sae = SAE.load_from_disk(str(args.demo / "kl_mse"))
    cfg = load_model(args.model).cfg
    seq = kl_run["config"]["context_size"] or sae.cfg.metadata.context_size
    flops = step_flops(cfg, kl_run["hook_name"], sae.cfg.d_sae, sae.cfg.k, seq)  # type: ignore[attr-defined]
    kl_rate, mse_rate = kl_run["train_tokens_per_second"], mse_run["train_tokens_per_second"]

    k = sae.cfg.k  # type: ignore[attr-defined]
    print(f"{args.demo}: {cfg.model_name}, SAE at {kl_run['hook_name']} (d_sae {sae.cfg.d_sae}, k {k}),")
    print(f"{seq}-token sequences, {cfg.n_layers} layers, vocabulary {cfg.d_vocab:,}")
    for name, value in flops.items():
        print(f"  MFLOP per token, {name:<44}{value / 1e6:>9.1f}")
    print(f"MSE-only step: {mse_rate:,.1f} tokens/s = {mse_rate * flops['mse'] / 1e9:.0f} GFLOP/s")
    print(f"KL+MSE step:   {kl_rate:,.1f} tokens/s = {kl_rate * flops['kl'] / 1e9:.0f} GFLOP/s")
    measured, floor = mse_rate / kl_rate, flops["kl"] / flops["mse"]
    print(f"KL+MSE per token / MSE-only per token: measured {measured:.2f}x, FLOPs {floor:.2f}x")


if __name__ == "__main__":
    main()
