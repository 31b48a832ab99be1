"""Weight stability (Karvonen 2025, App. H): how far a fine-tune moved each latent's directions."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import SAE


@torch.no_grad()
def weight_stability(before: SAE[Any], after: SAE[Any]) -> dict[str, dict[str, float]]:
    """How far each latent's weights moved (Karvonen 2025, App. H): the cosine similarity between
    the two SAEs' encoder vectors (W_enc[:, i]) and decoder vectors (W_dec[i]) of every latent,
    as its 25th/50th/75th percentiles. 1.0 means the direction did not move."""
    if (before.cfg.d_in, before.cfg.d_sae) != (after.cfg.d_in, after.cfg.d_sae):
        raise ValueError(
            f"Weight stability compares SAEs of one shape; got d_in x d_sae {before.cfg.d_in} x "
            f"{before.cfg.d_sae} and {after.cfg.d_in} x {after.cfg.d_sae}."
        )
    return {
        "encoder": latent_cosine_percentiles(before.W_enc.T, after.W_enc.T),
        "decoder": latent_cosine_percentiles(before.W_dec, after.W_dec),
    }


@torch.no_grad()
def latent_cosine_percentiles(start: torch.Tensor, end: torch.Tensor) -> dict[str, float]:
    """25th/50th/75th percentiles over latents (rows) of the cosine similarity of `start` and `end`."""
    cosine = torch.nn.functional.cosine_similarity(start.double(), end.to(start.device).double(), dim=-1)
    quantiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    p25, p50, p75 = torch.quantile(cosine.cpu(), quantiles).tolist()
    return {"p25": p25, "p50": p50, "p75": p75}
