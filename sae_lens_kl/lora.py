"""LoRA on the SAE (Karvonen 2025, App. D): the fine-tune trains only low-rank updates of the
encoder and decoder, W = W0 + (alpha / r) A B (peft's LoRA), through torch parametrizations, and
merges them into W0 at the end, so the artifact is a plain SAE of the original architecture.
Biases and other parameters stay frozen. peft's lora_dropout (0.1 in the paper's code) acts on
the layer's input inside its forward, which a parametrization of the weight cannot express; it
is left out.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from sae_lens import TrainingSAE
from torch import nn
from torch.nn.utils import parametrize

LORA_WEIGHTS = ("W_enc", "W_dec")


class LowRankUpdate(nn.Module):
    """W -> W + (alpha / r) A B for a weight W [in, out] that maps x -> x W (SAELens's W_enc
    [d_in, d_sae] and W_dec [d_sae, d_in]), in peft's convention for the nn.Linear computing the
    same map (weight W^T [out, in], update lora_B @ lora_A): A = lora_A^T [in, r] starts as peft's
    Kaiming-uniform lora_A (bound 1/sqrt(in)), B = lora_B^T [r, out] at zero, so the SAE's outputs
    are unchanged before the first step; the update is scaled by lora_alpha / r (the paper's
    code: peft's LoraConfig with lora_alpha=32). A is drawn from a fixed seed so that runs repeat
    exactly."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        rows, cols = weight.shape
        bound = 1 / math.sqrt(rows)
        a = torch.rand(rows, rank, generator=generator, dtype=torch.float64) * 2 * bound - bound
        self.A = nn.Parameter(a.to(weight.device, weight.dtype))
        self.B = nn.Parameter(torch.zeros(rank, cols, device=weight.device, dtype=weight.dtype))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.A @ self.B)


def check_rank(rank: int, d_in: int, d_sae: int) -> None:
    if not 0 < rank < min(d_in, d_sae):
        raise ValueError(
            f"sae_lora_rank={rank} must lie in (0, {min(d_in, d_sae)}): below the SAE's smaller "
            f"dimension (d_in {d_in}, d_sae {d_sae}), or it is no low-rank update."
        )


def add_lora(sae: TrainingSAE[Any], rank: int, alpha: float = 32.0, seed: int = 0) -> None:
    """Freeze every parameter of `sae` and train a rank-`rank` update of W_enc and W_dec, scaled
    by alpha / rank."""
    check_rank(rank, sae.cfg.d_in, sae.cfg.d_sae)
    for parameter in sae.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in LORA_WEIGHTS:
        update = LowRankUpdate(getattr(sae, name), rank, alpha, generator)
        parametrize.register_parametrization(sae, name, update)


def merge_lora(sae: TrainingSAE[Any]) -> None:
    """Fold the trained updates into W_enc and W_dec (plain parameters again, trainable as before
    add_lora froze them)."""
    if not parametrize.is_parametrized(sae):
        return
    for name in LORA_WEIGHTS:
        parametrize.remove_parametrizations(sae, name, leave_parametrized=True)
    for parameter in sae.parameters():
        parameter.requires_grad_(True)
