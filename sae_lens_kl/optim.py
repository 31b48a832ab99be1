"""Adam and its schedule as the fine-tune runs them, around SAELens's: its trainer config, the
fused kernel, continuing another run's moments, and decoder rows kept at unit norm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens import LoggingConfig
from sae_lens.config import SAETrainerConfig

from sae_lens_kl.config import KLFinetuneConfig


def trainer_config(
    cfg: KLFinetuneConfig,
    n_steps: int,
    tokens_per_step: int,
    device: torch.device,
    checkpoint_dir: Path | None,
    is_main: bool,
) -> SAETrainerConfig:
    """SAELens's trainer config of a fine-tune of `n_steps` steps: its lr schedule (constant, or
    linear decay to 0 after warm-up), sparsity statistics windows, checkpoint folder and logging."""
    return SAETrainerConfig(
        total_training_samples=n_steps * tokens_per_step,
        train_batch_size_samples=tokens_per_step,
        lr=cfg.lr,
        lr_end=cfg.lr,
        # constant + decay over every step after warm-up = linear decay to 0 (paper §3.3)
        lr_scheduler_name="constant",
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=n_steps - cfg.lr_warm_up_steps if cfg.lr_schedule == "linear" else 0,
        device=str(device),
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.feature_sampling_window,
        n_checkpoints=0,
        checkpoint_path=None if checkpoint_dir is None else str(checkpoint_dir),
        save_final_checkpoint=checkpoint_dir is not None,
        logger=LoggingConfig(
            log_to_wandb=cfg.log_to_wandb and is_main,
            wandb_project=cfg.wandb_project,
            wandb_log_frequency=cfg.wandb_log_frequency,
        ),
    )


def use_fused_adam(optimizer: torch.optim.Optimizer) -> None:
    """Switch SAETrainer's Adam to torch's fused kernel: the same update in one pass over each
    parameter. SAELens builds it with the defaults, which on CPU step one tensor at a time
    (docs/performance.md, kernel choices). Set before the first step, so the optimizer state is
    created in the fused layout and checkpoints record it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        # Adam's own check of fused support for these parameters' devices and dtypes.
        torch.optim.Adam(params, fused=True)
    except RuntimeError:
        return
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False


def continue_adam(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Continue another run's Adam (`state`: its state dict over the same parameters, e.g. the MSE
    phase's): its moments and step counts; `optimizer`'s own lr, schedule and betas."""
    own_settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own_settings, strict=True):
        group.update(settings)
        for parameter in group["params"]:
            step = optimizer.state[parameter].get("step")
            if group["fused"] and step is not None:  # fused Adam keeps its step on the device
                optimizer.state[parameter]["step"] = step.to(dtype=torch.float32, device=parameter.device)


@torch.no_grad()
def remove_gradient_along_rows(weight: torch.Tensor) -> None:
    """Drop the component of each row's gradient along the (unit) row: a step then turns rows
    rather than scaling them."""
    if weight.grad is not None:
        weight.grad -= (weight.grad * weight).sum(-1, keepdim=True) * weight


@torch.no_grad()
def normalise_rows(weight: torch.Tensor) -> None:
    weight /= weight.norm(dim=-1, keepdim=True)
