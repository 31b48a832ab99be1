"""SAELens's `SAETrainer` with the KL+MSE fine-tune step.

The data provider yields token batches instead of activations; `step` counts tokens and
`_train_step` runs the spliced forward pass. Optimiser, LR schedule, coefficient schedulers,
sparsity statistics, checkpoint layout and wandb logging are SAELens's.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from sae_lens_kl.checkpoints import FINETUNE_STATE_FILENAME, prune
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.controller import SparsityController
from sae_lens_kl.losses import Objective, StepTensors, needs_spliced_run, objective_of, recorded_hooks
from sae_lens_kl.methods import Replacement, TrainedModule, sae_reconstruction
from sae_lens_kl.optim import (
    continue_adam,
    normalise_rows,
    remove_gradient_along_rows,
    trainer_config,
    use_fused_adam,
)
from sae_lens_kl.parallel import DataParallel
from sae_lens_kl.runs import CleanRun, SpliceRunner, position_mask
from sae_lens_kl.sparse_topk import use_sparse_topk
from sae_lens_kl.stability import latent_cosine_percentiles
from sae_lens_kl.staging import staged_folder
from sae_lens_kl.transcoders import TranscoderStepInput

StepCallback = Callable[["KLFinetuneTrainer", TrainStepOutput], None]


class NonFiniteLossError(RuntimeError):
    pass


def _at_rows(recorded: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Recorded [batch, pos, ...] activations at the kept rows, [rows, ...]."""
    return {hook: acts.flatten(0, 1)[rows] for hook, acts in recorded.items()}


@torch.no_grad()
def _firing_counts(feature_acts: torch.Tensor) -> torch.Tensor:
    """[d_sae] int64: on how many of the [rows, d_sae] activations' rows each latent fired.
    SAELens's sparse TopK activations are counted from their entries, not densified; dense ones
    are summed as int32 (a bool sum to int64 first converts the whole [rows, d_sae] matrix;
    docs/performance.md, kernel choices)."""
    if feature_acts.is_sparse:
        chosen = feature_acts.coalesce()
        latents = chosen.indices()[-1][chosen.values() != 0]
        return torch.bincount(latents, minlength=feature_acts.shape[-1])
    return (feature_acts != 0).sum(0, dtype=torch.int32).long()


class KLFinetuneTrainer(SAETrainer[TrainingSAE[Any], Any]):
    """SAELens's trainer whose data provider yields one `CleanRun` per token batch and whose step
    splices the `replacement`'s output in and minimises the `objective`."""

    def __init__(
        self,
        sae: TrainingSAE[Any],
        runner: SpliceRunner,
        clean_runs: Iterator[CleanRun],
        cfg: KLFinetuneConfig,
        *,
        context_size: int,
        objective: Objective | None = None,
        replacement: Replacement = sae_reconstruction,
        special_token_ids: Sequence[int] = (),
        controller: SparsityController | None = None,
        checkpoint_dir: Path | None = None,
        fingerprints: dict[str, str] | None = None,
        callbacks: Sequence[StepCallback] = (),
        modules: Sequence[TrainedModule] = (),
        parallel: DataParallel | None = None,
    ) -> None:
        parallel = parallel or DataParallel()
        tokens_per_step = cfg.batch_size * context_size
        n_steps = cfg.tokens // tokens_per_step
        use_sparse_topk(sae, cfg.sparse_topk if cfg.sparse_topk is not None else sae.device.type == "cpu")
        super().__init__(
            trainer_config(cfg, n_steps, tokens_per_step, sae.device, checkpoint_dir, parallel.is_main),
            sae,
            data_provider=clean_runs,
        )
        self.modules = list(modules)
        if self.modules:
            self._train_modules_too()
        use_fused_adam(self.optimizer)
        self.runner = runner
        self.parallel = parallel
        self.ft_cfg = cfg
        self.objective = objective if objective is not None else objective_of(cfg)
        self.replacement = replacement
        self.special_token_ids = list(special_token_ids)
        self.controller = controller
        self.callbacks = list(callbacks)
        self.tokens_per_step = tokens_per_step
        self.fingerprints = dict(fingerprints or {})
        # Weight stability (paper App. H) against the starting weights, logged with wandb's steps.
        self.start_weights = (
            {"encoder": sae.W_enc.detach().T.clone(), "decoder": sae.W_dec.detach().clone()}
            if cfg.log_to_wandb
            else None
        )
        self.last_checkpoint: Path | None = None
        self._next_checkpoint_tokens = cfg.checkpoint_every_tokens

    # ---- the step -------------------------------------------------------------------------------

    def step(self, batch: CleanRun) -> TrainStepOutput:  # type: ignore[override]
        """One fine-tune step on a batch's clean run (this rank's part of it); counts the global
        batch's tokens, not sequences."""
        self.n_training_samples += batch.numel() * self.parallel.world_size
        return self._train_step(sae=self.sae, sae_in=batch)  # type: ignore[arg-type]

    def _train_step(self, sae: TrainingSAE[Any], sae_in: CleanRun) -> TrainStepOutput:  # type: ignore[override]
        # SAETrainer's seam names it sae_in; here it is the clean run of a [batch, pos] token batch.
        run, cfg = sae_in, self.ft_cfg
        keep = position_mask(run.tokens, self.special_token_ids, cfg.exclude_first_positions)
        rows = keep.flatten().nonzero().squeeze(1)  # positions the reconstruction replaces

        # The replacement (the SAE) on the clean activations at those rows, then the loss terms
        # (the spliced suffix runs from the clean run's prefix when a term reads it).
        sae.train()
        with self.autocast_if_enabled:
            out = self.replacement(sae, self._step_input(run.acts, run, rows))
        tensors = self._step_tensors(run, rows, out)
        local = {term.name: term(tensors) for term in self.objective.terms}
        firing = _firing_counts(out.feature_acts)
        sae_mse = out.losses["mse_loss"]
        statistics = {"aux": out.loss - sae_mse, "sae_mse": sae_mse, "l0": firing.sum() / len(rows)}
        # means over every rank's rows (a single process: unchanged)
        means = self.parallel.global_means({**local, **statistics}, len(rows))
        values = {name: means[name] for name in local}
        loss, alpha = self.objective.combine(values, means["aux"], means["sae_mse"])
        numbers = self._checked_numbers(loss=loss, kl=values.get("kl"), alpha=alpha, l0=means["l0"])

        self._record_firing(firing, len(rows))
        self._update(sae, loss)
        self._advance_schedules(numbers["l0"])
        return self._step_output(out, loss, values, numbers)

    def _step_tensors(self, run: CleanRun, rows: torch.Tensor, out: TrainStepOutput) -> StepTensors:
        """What the loss terms read; the spliced suffix runs only when one of them needs it."""
        clean, spliced, spliced_at = None, None, {}
        if needs_spliced_run(self.objective):
            splice = functools.partial(self._spliced_rows, run=run, rows=rows, sae_out=out.sae_out)
            output, spliced_at = self.runner.spliced_output(run, splice, recorded_hooks(self.objective))
            clean, spliced = run.clean_rows(rows), output.flatten(0, 1)[rows]
        return StepTensors(
            out,
            clean,
            spliced,
            self.runner.projection,
            self.ft_cfg.kl_chunk_tokens,
            clean_at=_at_rows(run.recorded, rows),
            spliced_at=_at_rows(spliced_at, rows),
        )

    def _spliced_rows(
        self, acts: torch.Tensor, *, run: CleanRun, rows: torch.Tensor, sae_out: torch.Tensor
    ) -> torch.Tensor:
        """`acts` [batch, pos, d] with the replacement's output at `rows`. When the spliced pass
        runs from the embedding, the method changed the SAE's input (LoRA before it), so the
        replacement is recomputed on the activations that pass brings."""
        if self.runner.spliced_from_start:
            sae_out = self.replacement(self.sae, self._step_input(acts, run, rows)).sae_out
        flat = acts.flatten(0, 1).index_put((rows,), sae_out.to(acts.dtype))
        return flat.view_as(acts)

    def _update(self, sae: TrainingSAE[Any], loss: torch.Tensor) -> None:
        loss.backward()
        self._optimizer_step(sae)

    def _optimizer_step(self, sae: TrainingSAE[Any]) -> None:
        """From the gradients backward left: summed over ranks, clipped to norm 1, one Adam step;
        decoder rows kept at unit norm when asked (their gradient along the row removed, then
        renormalised)."""
        self.parallel.sum_gradients(self.trained_parameters())
        if self.ft_cfg.decoder_unit_norm:
            remove_gradient_along_rows(sae.W_dec)
        torch.nn.utils.clip_grad_norm_(self.trained_parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.ft_cfg.decoder_unit_norm:
            normalise_rows(sae.W_dec)
        self.parallel.broadcast_buffers(sae)

    def trained_parameters(self) -> list[torch.Tensor]:
        """Every parameter the optimizer updates: the SAE's and those of the trained modules."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def continue_optimizer(self, state: dict[str, Any]) -> None:
        """Continue another run's Adam (`state`: its state dict over this SAE's parameters, e.g.
        the MSE phase's): its moments and step counts; this fine-tune's lr, schedule and betas."""
        continue_adam(self.optimizer, state)

    def _train_modules_too(self) -> None:
        """Put the modules' parameters into SAELens's Adam (one more param group, same lr and
        betas) and rebuild its LR schedule over both groups, as SAETrainer builds it (sae-lens 6.54
        has no seam for extra parameters; no step has run yet, so nothing is lost)."""
        self.optimizer.add_param_group({"params": [p for m in self.modules for p in m.parameters()]})
        self.lr_scheduler = get_lr_scheduler(
            self.cfg.lr_scheduler_name,
            lr=self.cfg.lr,
            optimizer=self.optimizer,
            warm_up_steps=self.cfg.lr_warm_up_steps,
            decay_steps=self.cfg.lr_decay_steps,
            training_steps=self.cfg.total_training_steps,
            lr_end=self.cfg.lr_end,  # type: ignore[arg-type]
            num_cycles=self.cfg.n_restart_cycles,
        )

    def _step_input(self, acts: torch.Tensor, run: CleanRun, rows: torch.Tensor) -> TrainStepInput:
        """SAELens's step input on `acts` [batch, pos, d] at `rows`; for a transcoder (the run
        carries its output hook's clean activations as `target`), the TranscoderStepInput its
        training class reads the MSE target from."""
        target = None if run.target is None else run.target.flatten(0, 1)[rows]
        step = {
            "sae_in": acts.flatten(0, 1)[rows],
            "dead_neuron_mask": self.dead_neurons,
            "coefficients": self.get_coefficients(),
            "n_training_steps": self.n_training_steps,
            "is_logging_step": self._is_logging_step(),
        }
        return TrainStepInput(**step) if target is None else TranscoderStepInput(**step, target=target)

    @torch.no_grad()
    def _checked_numbers(self, **values: torch.Tensor | None) -> dict[str, float]:
        """Host copies of the step's scalars (l0: mean of the per-row counts), in one device sync
        per step; a non-finite loss stops the run before the SAE is updated."""
        nan = torch.tensor(float("nan"), device=values["loss"].device)  # type: ignore[union-attr]
        scalars = [nan if v is None else v.detach().float().mean() for v in values.values()]
        numbers = dict(zip(values, torch.stack(scalars).tolist(), strict=True))
        if not math.isfinite(numbers["loss"]):
            raise NonFiniteLossError(
                f"The loss became {numbers['loss']} at step {self.n_training_steps} (after "
                f"{self.n_training_samples - self.tokens_per_step} training tokens); the SAE was not "
                f"updated. Last good checkpoint: {self.last_checkpoint or 'none saved'}. Resume from "
                "it with a lower lr, or check the data and the model's dtype."
            )
        return numbers

    def _advance_schedules(self, l0: float) -> None:
        """LR and coefficient schedules one step on; the L0 controller moves its coefficient."""
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        if self.controller is not None:
            self.controller.update(self.coefficient_schedulers[self.controller.coefficient_name], l0)

    def _step_output(
        self,
        out: TrainStepOutput,
        loss: torch.Tensor,
        values: dict[str, torch.Tensor],
        numbers: dict[str, float],
    ) -> TrainStepOutput:
        out.loss = loss.detach()
        for name, value in values.items():
            out.losses.setdefault(f"{name}_loss", value.detach())
        out.metrics.update(numbers)
        if self.start_weights is not None and self._is_logging_step():
            now = {"encoder": self.sae.W_enc.detach().T, "decoder": self.sae.W_dec.detach()}
            for part, start in self.start_weights.items():
                percentiles = latent_cosine_percentiles(start, now[part])
                out.metrics.update({f"weight_stability_{part}_{q}": v for q, v in percentiles.items()})
        return out

    @torch.no_grad()
    def _record_firing(self, firing: torch.Tensor, n_rows: int) -> None:
        """SAELens's dead-latent and firing-frequency statistics, over the rows actually trained
        (on every rank), from the step's `_firing_counts`."""
        counts = self.parallel.sum_(torch.cat([firing, firing.new_tensor([n_rows])]))
        self.n_forward_passes_since_fired += 1
        self.n_forward_passes_since_fired[counts[:-1] > 0] = 0
        self.act_freq_scores += counts[:-1]
        self.n_frac_active_samples += int(counts[-1])

    # ---- checkpoints ----------------------------------------------------------------------------

    @torch.no_grad()
    def _checkpoint_if_needed(self) -> None:
        every = self.ft_cfg.checkpoint_every_tokens
        if every is None or self.cfg.checkpoint_path is None:
            return
        if self.n_training_samples >= (self._next_checkpoint_tokens or every):
            if self.n_training_samples < self.cfg.total_training_samples:  # the final one follows
                self.save_checkpoint(checkpoint_name=str(self.n_training_samples))
            while self._next_checkpoint_tokens <= self.n_training_samples:  # type: ignore[operator]
                self._next_checkpoint_tokens += every  # type: ignore[operator]

    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        """SAELens's checkpoint, written to a temporary folder and renamed into place, so a run
        killed mid-write never leaves a half checkpoint."""
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if not self.parallel.is_main:  # rank 0 writes; every rank resumes from its checkpoints
            return
        if base is None:
            super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)
            return
        final = Path(base) / checkpoint_name
        with staged_folder(final) as staging:
            super().save_checkpoint(staging.name, staging.parent, wandb_aliases)
        self.last_checkpoint = final
        prune(Path(base), self.ft_cfg.keep_checkpoints)

    def save_trainer_state(self, checkpoint_path: Path) -> None:
        super().save_trainer_state(checkpoint_path)
        for module in self.modules:
            module.save(checkpoint_path / module.filename)
        state: dict[str, Any] = {
            "config": self.ft_cfg.to_dict(),
            "train_sequences_consumed": self.n_training_steps_done * self.ft_cfg.batch_size,
            "training_tokens": self.n_training_samples,
            "controller": None,
            "fingerprints": self.fingerprints,
            "world_size": self.parallel.world_size,
        }
        if self.controller is not None:
            scheduler = self.coefficient_schedulers[self.controller.coefficient_name]
            state["controller"] = self.controller.state_dict(scheduler)
        (checkpoint_path / FINETUNE_STATE_FILENAME).write_text(json.dumps(state, indent=2))

    def load_trainer_state(self, checkpoint_path: Path | str) -> None:
        super().load_trainer_state(checkpoint_path)
        self.last_checkpoint = Path(checkpoint_path)
        # SAETrainer.fit saves checkpoints before advancing n_training_steps (sae-lens 6.54, checked
        # by tests/test_sae_lens_seams.py), so the stored count is one behind the steps taken;
        # continue from the true count.
        self.n_training_steps = self.n_training_steps_done
        state = json.loads((Path(checkpoint_path) / FINETUNE_STATE_FILENAME).read_text())
        if self.controller is not None and state["controller"] is not None:
            scheduler = self.coefficient_schedulers[self.controller.coefficient_name]
            self.controller.load_state_dict(state["controller"], scheduler)
        every = self.ft_cfg.checkpoint_every_tokens
        if every is not None:
            self._next_checkpoint_tokens = (self.n_training_samples // every + 1) * every

    @property
    def n_training_steps_done(self) -> int:
        """Completed optimiser steps. `fit` advances n_training_steps only after checkpointing, so
        inside a step's checkpoint the step just taken is counted here."""
        return self.n_training_samples // self.tokens_per_step

    # ---- progress -------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_pbar(
        self,
        step_output: TrainStepOutput,
        pbar: tqdm,
        update_interval: int = 1,  # noqa: ARG002 (SAETrainer's signature; we update every step)
    ) -> None:
        # The last call of each iteration of SAETrainer.fit (sae-lens 6.54 has no callback seam;
        # the order is checked by tests/test_sae_lens_seams.py): progress, then user callbacks.
        metrics = step_output.metrics
        if not self.parallel.is_main:
            pbar.disable = True
        pbar.update(self.tokens_per_step)
        # only the numbers this objective has (no kl for "mse", no alpha beside a fixed weight)
        shown = {name: metrics[name] for name in ("kl", "alpha") if not math.isnan(metrics[name])}
        pbar.set_postfix(
            **{name: f"{value:.4g}" for name, value in shown.items()},
            mse=f"{step_output.losses['mse_loss'].item():.4g}",
            l0=f"{metrics['l0']:.1f}",
            lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
            refresh=False,
        )
        for callback in self.callbacks:
            callback(self, step_output)
