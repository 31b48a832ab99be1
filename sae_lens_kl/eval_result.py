"""What a held-out evaluation reports: the metrics of one SAE spliced in, and the per-sequence
sums a paired bootstrap resamples (intervals.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from sae_lens.evals import ExplainedVarianceCalculator


@dataclass
class EvalResult:
    """Metrics over the evaluated positions (special tokens and excluded first positions left out,
    as SAELens's evals leave out special tokens). CE and KL are nats per token."""

    ce_clean: float
    """Cross-entropy of the clean model."""
    ce_spliced: float
    """Cross-entropy with the SAE's reconstruction spliced in."""
    ce_ablated: float
    """Cross-entropy with the replaced hook's activation zeroed (SAELens's zero ablation)."""
    ce_gap: float
    """ce_spliced - ce_clean: what the fine-tune tries to close."""
    ce_score: float
    """(ce_ablated - ce_spliced) / (ce_ablated - ce_clean), SAELens's ce_loss_score."""
    kl: float
    """Mean KL(p_clean || p_spliced)."""
    kl_ablated: float
    """Mean KL(p_clean || p_ablated)."""
    kl_score: float
    """(kl_ablated - kl) / kl_ablated, SAELens's kl_div_score."""
    l0: float
    """Mean active latents per token."""
    mse: float
    """Mean over tokens of the squared reconstruction error summed over dimensions (a transcoder's:
    against the clean activation at its output hook, which its output replaces)."""
    explained_variance: float
    """1 - E||x - x_hat||^2 / Var(x) (SAELens's ExplainedVarianceCalculator)."""
    dead_latents: int
    """Latents that never fired on these tokens."""
    downstream_mse: dict[str, float]
    """At every later hook_resid_post: mean over tokens of the squared difference between the
    spliced and the clean activation, summed over dimensions (Braun et al. 2024, Fig. 2): how far
    the reconstruction's error travels down the network."""
    n_tokens: int
    """Positions evaluated."""
    per_sequence: dict[str, list[float]] = field(default_factory=dict, repr=False)
    """Per held-out sequence, in order: the sums of ce_clean and ce_spliced over its CE positions
    and their count (`n_tokens`): what a paired bootstrap resamples (intervals.py). Not in
    `to_dict`: reports carry the intervals computed from it."""

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        del values["per_sequence"]
        return values

    def copy(self) -> EvalResult:
        return dataclasses.replace(
            self,
            downstream_mse=dict(self.downstream_mse),
            per_sequence={name: list(values) for name, values in self.per_sequence.items()},
        )


def per_sequence_sums(
    parts: dict[str, list[torch.Tensor]], sequence_parts: dict[str, list[torch.Tensor]]
) -> dict[str, list[float]]:
    """Sums of the per-position clean and spliced CE over each sequence, in float64, and counts."""
    offsets = torch.cumsum(
        torch.cat([torch.zeros(1, dtype=torch.long), *sequence_parts["batch_sequences"]]), 0
    )
    sequence = torch.cat(
        [
            ids.cpu() + offset
            for ids, offset in zip(sequence_parts["ce_sequence"], offsets[:-1].tolist(), strict=True)
        ]
    )
    n_sequences = int(offsets[-1])
    sums = {}
    for name in ("ce_clean", "ce_spliced"):
        values = torch.cat([part.cpu() for part in parts[name]]).double()
        sums[name] = torch.zeros(n_sequences, dtype=torch.float64).index_add_(0, sequence, values).tolist()
    ones = torch.ones(len(sequence), dtype=torch.float64)
    sums["n_tokens"] = torch.zeros(n_sequences, dtype=torch.float64).index_add_(0, sequence, ones).tolist()
    return sums


def result_of(
    parts: dict[str, list[torch.Tensor]],
    sequence_parts: dict[str, list[torch.Tensor]],
    variance: ExplainedVarianceCalculator,
    fired: torch.Tensor,
) -> EvalResult:
    """The EvalResult of an evaluation's per-token values (`parts`: per batch, by metric; later
    hooks' as "downstream:<hook>"), which sequence each CE position belongs to, the explained
    variance's sums and which latents fired."""
    # means accumulated in float64: n_tokens terms would lose float32 digits
    means = {name: torch.cat(values).double().mean().item() for name, values in parts.items()}
    ce_clean, ce_spliced, ce_ablated = means["ce_clean"], means["ce_spliced"], means["ce_ablated"]
    return EvalResult(
        ce_clean=ce_clean,
        ce_spliced=ce_spliced,
        ce_ablated=ce_ablated,
        ce_gap=ce_spliced - ce_clean,
        ce_score=(ce_ablated - ce_spliced) / (ce_ablated - ce_clean),
        kl=means["kl"],
        kl_ablated=means["kl_ablated"],
        kl_score=(means["kl_ablated"] - means["kl"]) / means["kl_ablated"],
        l0=means["l0"],
        mse=means["mse"],
        explained_variance=variance.compute(),
        dead_latents=int((~fired).sum().item()),
        downstream_mse={
            name.removeprefix("downstream:"): value
            for name, value in means.items()
            if name.startswith("downstream:")
        },
        n_tokens=sum(part.numel() for part in parts["l0"]),
        per_sequence=per_sequence_sums(parts, sequence_parts),
    )


def merged_variance(states: list[dict[str, Any]]) -> ExplainedVarianceCalculator:
    """One ExplainedVarianceCalculator over the batches of several (its sums added: the four
    attributes of sae-lens 6.54's calculator, which has no merge method)."""
    merged = ExplainedVarianceCalculator()
    for state in states:
        if state["sum_x"] is None:
            continue
        merged.sum_x = state["sum_x"] if merged.sum_x is None else merged.sum_x + state["sum_x"]
        merged.sum_squared_norm += state["sum_squared_norm"]
        merged.sum_squared_residual += state["sum_squared_residual"]
        merged.num_samples += state["num_samples"]
    return merged
