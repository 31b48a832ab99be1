"""Several SAEs fine-tuned on one model in lockstep, sharing the clean forward pass.

Per batch the layers before the earliest SAE run once, and one clean suffix from there records,
for every SAE, the residual entering its block and the activation at its hook, plus the
unembedding input. Each SAE then takes the same step as from a clean-pass cache (so, as that path,
exactly the step it would take alone). SAELens's `MultiSAETrainer` drives the per-SAE trainers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_lens_kl.cache import CleanRun
from sae_lens_kl.losses import clean_statistics
from sae_lens_kl.splice import CompiledBlocks, HookSite, VocabProjection, run_prefix, run_to_output
from sae_lens_kl.trainer import KLFinetuneTrainer


@torch.no_grad()
def shared_clean_runs(
    model: HookedTransformer,
    batches: Iterator[torch.Tensor],
    sites: Mapping[str, HookSite],
    blocks: CompiledBlocks | None = None,
    chunk_tokens: int = 256,
) -> Iterator[dict[str, CleanRun]]:
    """For each token batch, every SAE's clean pass from one prefix and one clean suffix (blocks
    holding a recording hook run eagerly, the others through `blocks` when given).

    The clean distribution is the same for every SAE. From three SAEs on, and when the
    unembedding allows it, it is handed over as CleanStatistics formed once per batch (two
    unembedding products, chunks of `chunk_tokens`) instead of each SAE forming the clean logits
    again (one product each): the same KL and gradients up to float rounding."""
    earliest = min(sites.values(), key=lambda site: site.block or 0)
    sae_blocks = sorted({site.block for site in sites.values() if site.block is not None})
    residuals: dict[int, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}

    def keep_residual(raw: torch.Tensor, hook: HookPoint, block: int) -> torch.Tensor:  # noqa: ARG001
        residuals[block] = raw
        return raw

    def keep_acts(raw: torch.Tensor, hook: HookPoint, name: str) -> torch.Tensor:  # noqa: ARG001
        acts[name] = sites[name].read(raw)
        return raw

    hooks = [(f"blocks.{block}.hook_resid_pre", _bind(keep_residual, block=block)) for block in sae_blocks]
    hooks += [(site.hook_name, _bind(keep_acts, name=name)) for name, site in sites.items()]
    projection = VocabProjection.for_run(model, prefix_reuse=True)
    share_statistics = len(sites) >= 3 and projection.supports_statistics
    for tokens in batches:
        tokens = tokens.to(model.cfg.device)
        prefix = run_prefix(model, tokens, earliest, blocks)
        with model.hooks(fwd_hooks=hooks):
            final, _ = run_to_output(model, tokens, prefix, earliest)
        clean: dict[str, Any] = (
            {"statistics": clean_statistics(final, projection, chunk_tokens)}
            if share_statistics
            else {"final": final}
        )
        yield {
            name: CleanRun(tokens, residuals[site.block], acts[name], **clean)  # type: ignore[index]
            for name, site in sites.items()
        }


def _bind(function: Any, **bound: Any) -> Any:
    """A TransformerLens hook (called as f(tensor, hook=...)) with extra arguments bound."""
    return lambda raw, hook: function(raw, hook, **bound)


class MultiKLFinetuneTrainer(MultiSAETrainer):
    """SAELens's multi-SAE coordinator, driving one `KLFinetuneTrainer` per SAE."""

    def __init__(
        self,
        trainers: Mapping[str, KLFinetuneTrainer],
        clean_runs: Iterator[dict[str, CleanRun]],
    ) -> None:
        first = next(iter(trainers.values()))
        saes: dict[str, TrainingSAE[Any]] = {name: trainer.sae for name, trainer in trainers.items()}
        # Checkpoints are each trainer's own (per-SAE folders, every N tokens and final).
        cfg = replace(first.cfg, n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False)
        super().__init__(cfg, saes, {name: name for name in trainers}, clean_runs)
        # SAELens builds plain SAETrainers for its SAEs; the KL trainers take their place.
        self.trainers = dict(trainers)  # type: ignore[assignment]

    def _checkpoint_if_needed(self) -> None:
        for trainer in self.trainers.values():
            trainer._checkpoint_if_needed()  # type: ignore[attr-defined]

    def fit(self) -> dict[str, TrainingSAE[Any]]:
        saes = super().fit()
        for trainer in self.trainers.values():
            if trainer.cfg.save_final_checkpoint:
                trainer.save_checkpoint(checkpoint_name=f"final_{trainer.n_training_samples}")
        return saes

    @torch.no_grad()
    def _update_pbar(self, step_outputs: dict[str, TrainStepOutput], pbar: tqdm) -> None:  # type: ignore[override]
        first = next(iter(self.trainers.values()))
        pbar.update(first.tokens_per_step)  # type: ignore[attr-defined]
        pbar.set_postfix(
            {f"kl[{name}]": f"{out.metrics['kl']:.4g}" for name, out in step_outputs.items()}, refresh=False
        )
        for name, trainer in self.trainers.items():
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                callback(trainer, step_outputs[name])
