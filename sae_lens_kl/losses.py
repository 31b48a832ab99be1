"""Loss terms of the fine-tune and the objectives that combine them (the registry `OBJECTIVES`);
the KL kernels they call are in kl.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepOutput

from sae_lens_kl.kl import CleanStatistics, kl_divergence
from sae_lens_kl.vocab import VocabProjection, kl_dtype

ALPHA_EPS = 1e-8  # paper §3.2: alpha = mse / (kl + 1e-8)


@dataclass
class StepTensors:
    """What one training step computed, for its loss terms to read. Rows are the positions where
    the SAE's reconstruction replaced the activation."""

    sae_output: TrainStepOutput
    """The SAE's training forward pass on the rows: sae_out, feature_acts, its own losses."""
    clean: torch.Tensor | CleanStatistics | None
    """The clean distribution at the rows (None when no term needs it)."""
    spliced: torch.Tensor | None
    """The spliced run's outputs at the rows (None when no term needs the spliced run)."""
    projection: VocabProjection
    chunk_tokens: int
    clean_at: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Clean activations [rows, d] at the hooks the terms asked for (`LossTerm.hooks`)."""
    spliced_at: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Spliced activations [rows, d] at those hooks."""


class LossTerm(Protocol):
    """One term of the fine-tune objective, computed from a step's tensors."""

    name: str
    needs_spliced_run: bool
    """Whether the step must run the spliced suffix (and the clean pass to the output) for it."""
    hooks: tuple[str, ...]
    """Hook points whose clean and spliced activations it reads (recorded by both passes)."""

    def __call__(self, step: StepTensors) -> torch.Tensor: ...


@dataclass(frozen=True)
class KLTerm:
    """KL(p_clean || p_spliced) of the next-token distributions, summed over the vocabulary, mean
    over the rows (`kl_divergence`: float32, chunked)."""

    name: str = "kl"
    needs_spliced_run: bool = True
    hooks: tuple[str, ...] = ()

    def __call__(self, step: StepTensors) -> torch.Tensor:
        assert step.clean is not None and step.spliced is not None
        return kl_divergence(step.clean, step.spliced, step.projection, step.chunk_tokens)


@dataclass(frozen=True)
class HookMSETerm:
    """The SAE's reconstruction error at its own hook, as SAELens computes it (`mse_loss`:
    squared error summed over dimensions, mean over the rows)."""

    name: str = "mse"
    needs_spliced_run: bool = False
    hooks: tuple[str, ...] = ()

    def __call__(self, step: StepTensors) -> torch.Tensor:
        return step.sae_output.losses["mse_loss"]


@dataclass(frozen=True)
class DownstreamMSETerm:
    """Mean over `hooks` of the MSE between spliced and clean activations there (mean over rows
    and dimensions: Braun et al. 2024's in_to_orig loss, whose weight is split evenly over hooks)."""

    hooks: tuple[str, ...]
    name: str = "downstream_mse"
    needs_spliced_run: bool = True

    def __call__(self, step: StepTensors) -> torch.Tensor:
        # float32 at least (float64 for a float64 model), as every loss term here
        dtype = kl_dtype(step.spliced_at[self.hooks[0]].dtype)
        per_hook = [F.mse_loss(step.spliced_at[h].to(dtype), step.clean_at[h].to(dtype)) for h in self.hooks]
        return torch.stack(per_hook).mean()


class Objective(Protocol):
    """Which loss terms a step computes and how they combine with the SAE's own sparsity and
    auxiliary losses (`aux`) into the loss it minimises."""

    @property
    def terms(self) -> tuple[LossTerm, ...]: ...

    def combine(
        self, values: Mapping[str, torch.Tensor], aux: torch.Tensor, sae_mse: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, alpha): alpha is the balancing factor when the objective has one, else None.
        `sae_mse`: the SAE's own MSE at its hook (SAELens's mse_loss), the scale `aux` was made
        for."""
        ...


@dataclass(frozen=True)
class BalancedKLMSE:
    """0.5 * (mse + alpha * kl) + aux, alpha = (mse / (kl + 1e-8)).detach() every batch
    (Karvonen 2025, §3.2)."""

    mse: LossTerm = HookMSETerm()
    kl: LossTerm = KLTerm()

    @property
    def terms(self) -> tuple[LossTerm, ...]:
        return (self.mse, self.kl)

    def combine(
        self,
        values: Mapping[str, torch.Tensor],
        aux: torch.Tensor,
        sae_mse: torch.Tensor | None = None,  # noqa: ARG002 (aux stays on the MSE's scale here)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mse, kl = values[self.mse.name], values[self.kl.name]
        alpha = (mse / (kl + ALPHA_EPS)).detach()
        return 0.5 * (mse + alpha * kl) + aux, alpha


@dataclass(frozen=True)
class WeightedSum:
    """sum of weight * term, + aux; with `aux_on_kl_scale` (objectives without an MSE term at
    the SAE's hook), aux * (kl / sae_mse).detach(): SAELens makes its aux-k and L1 losses for
    MSE training, where their coefficient sets their weight against the MSE; mapped onto the KL's
    scale by the ratio the balancing alpha uses, they keep that weight against the KL instead of
    swamping it (a KL of ~0.2 nats beside an MSE-scale aux of ~100s)."""

    weighted: tuple[tuple[LossTerm, float], ...]
    aux_on_kl_scale: bool = False

    @property
    def terms(self) -> tuple[LossTerm, ...]:
        return tuple(term for term, _ in self.weighted)

    def combine(
        self, values: Mapping[str, torch.Tensor], aux: torch.Tensor, sae_mse: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.aux_on_kl_scale:
            if sae_mse is None:
                raise ValueError("This objective scales aux by kl / sae_mse: pass sae_mse.")
            aux = aux * (values[KLTerm.name] / (sae_mse + ALPHA_EPS)).detach()
        loss = aux
        for term, weight in self.weighted:
            loss = weight * values[term.name] + loss
        return loss, None


def needs_spliced_run(objective: Objective) -> bool:
    """Whether the objective's terms need the spliced suffix, and so the clean distribution."""
    return any(term.needs_spliced_run for term in objective.terms)


def recorded_hooks(objective: Objective) -> tuple[str, ...]:
    """The hooks whose clean and spliced activations the objective's terms read."""
    return tuple(dict.fromkeys(hook for term in objective.terms for hook in term.hooks))


@dataclass(frozen=True)
class ObjectiveEntry:
    """What a `loss=` name stands for: its objective, built from a `KLFinetuneConfig` (its
    coefficients; its downstream hooks once plan.py has resolved them), and what the run must
    prepare for it."""

    build: Callable[[Any], Objective]
    formula: str
    takes_downstream_hooks: bool = False
    """It compares activations at hooks after the SAE's (`downstream_hooks`): plan.py resolves
    them, and a clean-pass cache, which does not store them, is refused."""


# `aux` is the architecture's own sparsity/auxiliary loss as SAELens computes it, on the MSE's
# scale; aux' = aux * (kl / sae_mse).detach() puts it on the KL's where no MSE term is minimised.
# The keys are config.LossMode's choices (tests/test_losses.py checks they agree).
OBJECTIVES: dict[str, ObjectiveEntry] = {
    "kl+mse": ObjectiveEntry(
        lambda _: BalancedKLMSE(), "0.5 * (mse + alpha * kl) + aux, alpha = (mse / (kl + 1e-8)).detach()"
    ),
    "kl": ObjectiveEntry(lambda _: WeightedSum(((KLTerm(), 1.0),), aux_on_kl_scale=True), "kl + aux'"),
    "mse": ObjectiveEntry(lambda _: WeightedSum(((HookMSETerm(), 1.0),)), "mse + aux"),
    "kl+mse-fixed": ObjectiveEntry(
        lambda cfg: WeightedSum(((HookMSETerm(), 1.0), (KLTerm(), cfg.kl_coefficient))),
        "mse + kl_coefficient * kl + aux",
    ),
    "e2e": ObjectiveEntry(
        lambda cfg: WeightedSum(((KLTerm(), cfg.kl_coefficient),), aux_on_kl_scale=True),
        "kl_coefficient * kl + aux'",
    ),
    "e2e+ds": ObjectiveEntry(
        lambda cfg: WeightedSum(
            (
                (KLTerm(), cfg.kl_coefficient),
                (DownstreamMSETerm(tuple(cfg.downstream_hooks or ())), cfg.downstream_coefficient),
            ),
            aux_on_kl_scale=True,
        ),
        "kl_coefficient * kl + downstream_coefficient * downstream_mse + aux'",
        takes_downstream_hooks=True,
    ),
}


def objective_of(cfg: Any) -> Objective:
    """The objective a `KLFinetuneConfig` names (its downstream hooks already resolved)."""
    return OBJECTIVES[cfg.loss].build(cfg)
