"""How far the first Adam step moves the SAE when the loss switches from MSE to KL+MSE and the MSE
phase's Adam is continued (the paper's A.1, experiment F's short arm), against a fresh Adam.

A fresh Adam's first update is lr per weight (with a nonzero gradient) whatever the gradient's
scale; a continued one divides by the MSE phase's running RMS of the gradients (beta2 = 0.999
forgets it over ~1,000 steps) and starts from its running mean, so an objective with larger
gradients could move the SAE much further than lr. This script measures the first step on a proxy
of F's short arm: the demo's cached MSE-phase SAE and the Adam state cached beside it (F's own
MSE phase, at a constant lr, is not cached), one step of F's batch (the MSE phase's 4 x 128
tokens) of each objective at one constant lr, continuing that Adam or with a fresh one. It prints
the RMS of each weight's change in the saved SAE (SAELens's inference form; a vanishing-lr step is
the reference) relative to the fresh Adam's on the same objective.

    python benchmarks/loss_switch.py --threads 2 --lr 2e-3    # F's lr (the MSE phase's)

Needs the demo's MSE phase cached (`sae-lens-kl demo` once; trained here otherwise, ~5 minutes).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from sae_lens_kl import kl_finetune
from sae_lens_kl.cli import build_parser
from sae_lens_kl.commands.demo import demo_setup, demo_start, mse_cache_folder
from sae_lens_kl.train import kl_phase_sequences


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=None, help="sequences (default: the MSE phase's batch)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo_args = build_parser().parse_args(["demo", "--kl-optimizer", "continued", "--eval-tokens", "0"])
    setup = demo_setup(demo_args)
    start, _ = demo_start(setup, demo_args)
    runner_cfg = setup.runner_cfg
    args.batch = args.batch or runner_cfg.train_batch_size_tokens // runner_cfg.context_size
    folder = mse_cache_folder(runner_cfg, setup.recipe.b_dec_init)
    tokens = args.batch * runner_cfg.context_size
    batch, _ = kl_phase_sequences(
        runner_cfg, setup.model, setup.train_data, runner_cfg.training_tokens, tokens, setup.recipe.b_dec_init
    )

    def one_step(loss: str, adam: str, lr: float) -> Any:
        return kl_finetune(
            copy.deepcopy(start),
            setup.model,
            batch,
            tokens=batch.numel(),
            batch_size=args.batch,
            lr=lr,
            lr_schedule="constant",
            loss=loss,
            eval_tokens=0,
            exclude_first_positions=setup.sinks,
            continue_optimizer_from=str(folder) if adam == "continued" else None,
        )

    print(
        f"One step of {args.batch} x {runner_cfg.context_size} tokens at lr {args.lr:g} (constant) from the "
        f"demo's MSE-phase SAE ({folder.name}); RMS of each weight's change, and the continued Adam's as a "
        "fraction of the fresh one's:"
    )
    names = ("W_enc", "W_dec", "b_enc", "b_dec")
    print(
        "| objective | Adam | "
        + " | ".join(f"{name} / lr" for name in names)
        + " | W_enc, W_dec: continued / fresh |"
    )
    print("|---|---|---|---|---|---|---|")
    # the returned SAE is the inference SAE SAELens would save (its weights can be stored in
    # another form than the training SAE's): the reference is the same step at a vanishing lr
    still = one_step("mse", "fresh", 1e-30)
    for loss in ("mse", "kl+mse"):
        moved = {}
        for adam in ("fresh", "continued"):
            tuned = one_step(loss, adam, args.lr)
            moved[adam] = [_rms(getattr(tuned, name) - getattr(still, name)) / args.lr for name in names]
            ratio = (
                ", ".join(f"{c / f:.2f}" for c, f in zip(moved[adam][:2], moved["fresh"][:2], strict=True))
                if adam == "continued"
                else ""
            )
            print(
                f"| {loss} | {adam} | "
                + " | ".join(f"{value:.3g}" for value in moved[adam])
                + f" | {ratio} |"
            )


def _rms(tensor: torch.Tensor) -> float:
    return tensor.detach().pow(2).mean().sqrt().item()


if __name__ == "__main__":
    main()
