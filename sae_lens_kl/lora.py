"""LoRA on the SAE (Karvonen 2025, App. D): the fine-tune trains only low-rank updates of the
encoder and decoder, W = W0 + B A, through torch parametrizations, and merges them into W0 at the
end, so the artifact is a plain SAE of the original architecture. Biases and other parameters
stay frozen.
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
    """W -> W + B A with A [rank, cols], B [rows, rank]. B starts at zero, so the SAE's outputs
    are unchanged before the first step; A starts as in LoRA (Kaiming-uniform), from a fixed seed
    so that runs repeat exactly."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        rows, cols = weight.shape
        bound = 1 / math.sqrt(cols)
        a = torch.rand(rank, cols, generator=generator, dtype=torch.float64) * 2 * bound - bound
        self.A = nn.Parameter(a.to(weight.device, weight.dtype))
        self.B = nn.Parameter(torch.zeros(rows, rank, device=weight.device, dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.B @ self.A


def check_rank(rank: int, d_in: int, d_sae: int) -> None:
    if not 0 < rank < min(d_in, d_sae):
        raise ValueError(
            f"sae_lora_rank={rank} must lie in (0, {min(d_in, d_sae)}): below the SAE's smaller "
            f"dimension (d_in {d_in}, d_sae {d_sae}), or it is no low-rank update."
        )


def add_lora(sae: TrainingSAE[Any], rank: int) -> None:
    """Freeze every parameter of `sae` and train a rank-`rank` update of W_enc and W_dec."""
    check_rank(rank, sae.cfg.d_in, sae.cfg.d_sae)
    for parameter in sae.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for name in LORA_WEIGHTS:
        parametrize.register_parametrization(sae, name, LowRankUpdate(getattr(sae, name), rank, generator))


def merge_lora(sae: TrainingSAE[Any]) -> None:
    """Fold the trained updates into W_enc and W_dec (plain parameters again, trainable as before
    add_lora froze them)."""
    if not parametrize.is_parametrized(sae):
        return
    for name in LORA_WEIGHTS:
        parametrize.remove_parametrizations(sae, name, leave_parametrized=True)
    for parameter in sae.parameters():
        parameter.requires_grad_(True)
