"""Who drives `fit`: one SAE's own trainer, or for several SAEs fine-tuned in lockstep on one
model (sharing the clean pass, `runs.shared_clean_runs`) SAELens's `MultiSAETrainer` driving
one trainer per SAE, each taking the step it would take alone. Everything else about a run is
the same for one SAE or many (api.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from tqdm.auto import tqdm

from sae_lens_kl.runs import CleanRun
from sae_lens_kl.trainer import KLFinetuneTrainer


def lockstep(
    trainers: Mapping[str, KLFinetuneTrainer], clean_runs: Iterator[dict[str, CleanRun]]
) -> KLFinetuneTrainer | MultiKLFinetuneTrainer:
    """What runs `fit` over the batches' clean runs (one dict of them per batch, by SAE name): a
    single SAE's trainer (SAELens's SAETrainer loop) reading its own, or for several the
    `MultiKLFinetuneTrainer` over all of them."""
    if len(trainers) > 1:
        return MultiKLFinetuneTrainer(trainers, clean_runs)
    ((name, trainer),) = trainers.items()
    trainer.data_provider = (runs[name] for runs in clean_runs)  # type: ignore[assignment]
    return trainer


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
        # SAELens builds plain SAETrainers for its SAEs and drives them only through step and
        # n_training_steps (sae-lens 6.54; tests/test_sae_lens_seams.py): the KL trainers take
        # their place.
        self.trainers = dict(trainers)  # type: ignore[assignment]
        # a resumed run continues from its trainers' restored counters
        self.n_training_samples, self.n_training_steps = first.n_training_samples, first.n_training_steps

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
        if not first.parallel.is_main:  # type: ignore[attr-defined]
            pbar.disable = True
        pbar.update(first.tokens_per_step)  # type: ignore[attr-defined]
        # the KL where the objective has one, else the MSE (never "nan")
        shown = {}
        for name, out in step_outputs.items():
            kl = out.metrics["kl"]
            if math.isnan(kl):
                shown[f"mse[{name}]"] = out.losses["mse_loss"].item()
            else:
                shown[f"kl[{name}]"] = kl
        pbar.set_postfix({key: f"{value:.4g}" for key, value in shown.items()}, refresh=False)
        for name, trainer in self.trainers.items():
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                callback(trainer, step_outputs[name])
