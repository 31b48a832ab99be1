"""How far one Adam step moves the SAE when the loss switches from MSE to KL+MSE and the MSE
phase's Adam is continued (the paper's A.1, experiment F's short arm), against a fresh Adam.

Adam's update per weight is m / (sqrt(v) + eps): about lr for a fresh Adam's first step, whatever
the gradient's scale, but for a continued one v holds the MSE phase's squared gradients (beta2 =
0.999: it forgets them over ~1,000 steps), so a new objective whose gradients are larger moves
every weight by lr times their ratio until v catches up. This script measures that on the demo's
cached MSE-phase SAE (and the Adam state cached beside it): one step of each objective on the same
batch, at one constant lr, continuing that Adam or with a fresh one, and prints the RMS of each
weight's update in units of lr.

    python benchmarks/loss_switch.py --threads 2 --lr 2e-3    # the MSE phase's lr (F's arms)
    python benchmarks/loss_switch.py --threads 2 --lr 4e-4    # the demo's KL lr

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
    parser.add_argument("--batch", type=int, default=8, help="sequences in the step's batch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo_args = build_parser().parse_args(["demo", "--kl-optimizer", "continued", "--eval-tokens", "0"])
    setup = demo_setup(demo_args)
    start, _ = demo_start(setup, demo_args)
    runner_cfg = setup.runner_cfg
    folder = mse_cache_folder(runner_cfg, setup.recipe.b_dec_init)
    tokens = args.batch * runner_cfg.context_size
    batch, _ = kl_phase_sequences(
        runner_cfg, setup.model, setup.train_data, runner_cfg.training_tokens, tokens
    )
    print(
        f"One step of {args.batch} x {runner_cfg.context_size} tokens at lr {args.lr:g} (constant) from the "
        f"demo's MSE-phase SAE ({folder.name}); RMS of each weight's update / lr:"
    )
    print("| objective | Adam | W_enc | W_dec | b_enc | b_dec |")
    print("|---|---|---|---|---|---|")

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

    # the returned SAE is the inference SAE SAELens would save (its weights can be stored in
    # another form than the training SAE's): the reference is the same step at a vanishing lr
    still = one_step("mse", "fresh", 1e-30)
    for loss in ("mse", "kl+mse"):
        for adam in ("continued", "fresh"):
            tuned = one_step(loss, adam, args.lr)
            moved = [
                _rms(getattr(tuned, name) - getattr(still, name)) / args.lr
                for name in ("W_enc", "W_dec", "b_enc", "b_dec")
            ]
            print(f"| {loss} | {adam} | " + " | ".join(f"{value:.3g}" for value in moved) + " |")


def _rms(tensor: torch.Tensor) -> float:
    return tensor.detach().pow(2).mean().sqrt().item()


if __name__ == "__main__":
    main()
