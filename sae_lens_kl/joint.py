"""A transcoder set fine-tuned as one replacement model (`replacement="joint"`): every transcoder
spliced at once in one spliced pass, each reading the activation that pass brings to its input
hook (the earlier transcoders' outputs included) and replacing its MLP's output. The loss is the
paper's, per transcoder, on the one KL of the replacement model: Σ_i 0.5·(MSE_i + α_i·KL) + aux_i,
α_i = (MSE_i / KL).detach(), MSE_i against transcoder i's own clean target; one backward, so the
KL's gradient reaches every transcoder through the later ones.

SAELens's `MultiSAETrainer` still drives the per-transcoder trainers (their Adam, schedules,
firing statistics, checkpoints and reports): the first trainer's step runs the joint step for the
batch it is given by `batches`, and every trainer's step returns its share of it."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepOutput
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule, HookPoint

from sae_lens_kl.kl import kl_divergence
from sae_lens_kl.losses import BalancedKLMSE
from sae_lens_kl.methods import SAEFinetune, method_of
from sae_lens_kl.parallel import DataParallel
from sae_lens_kl.plan import Plan
from sae_lens_kl.replacement import check_transcoder_set
from sae_lens_kl.runs import CleanRun, position_mask
from sae_lens_kl.splice import run_to_output
from sae_lens_kl.trainer import KLFinetuneTrainer, _firing_counts


class JointReplacementStep:
    """The joint step of a set of transcoder trainers (keyed as the clean runs are)."""

    def __init__(self, trainers: Mapping[str, KLFinetuneTrainer]) -> None:
        self.trainers = dict(trainers)
        self.objective = BalancedKLMSE()
        self._batch: dict[str, CleanRun] = {}
        self._outputs: dict[str, TrainStepOutput] = {}

    def batches(self, clean_runs: Iterator[dict[str, CleanRun]]) -> Iterator[dict[str, CleanRun]]:
        """The clean runs, each batch kept for the joint step its trainers' steps then share."""
        for runs in clean_runs:
            self._batch, self._outputs = runs, {}
            yield runs

    def output_for(self, name: str) -> TrainStepOutput:
        if not self._outputs:
            self._outputs = self._step(self._batch)
        return self._outputs.pop(name)

    def _step(self, runs: Mapping[str, CleanRun]) -> dict[str, TrainStepOutput]:
        names = list(self.trainers)
        first_trainer, first = self.trainers[names[0]], runs[names[0]]
        cfg = first_trainer.ft_cfg
        keep = position_mask(first.tokens, first_trainer.special_token_ids, cfg.exclude_first_positions)
        rows = keep.flatten().nonzero().squeeze(1)
        outs: dict[str, TrainStepOutput] = {}
        hooks = []
        for name, trainer in self.trainers.items():
            trainer.sae.train()
            read = functools.partial(self._replace_at_input, name=name, run=runs[name], rows=rows, outs=outs)
            write = functools.partial(self._write_output, name=name, rows=rows, outs=outs)
            hooks += [(trainer.runner.site.hook_name, read), (trainer.runner.write_site.hook_name, write)]
        model = first_trainer.runner.model
        # from the earliest transcoder's block (the clean runs are keyed in layer order)
        with first_trainer.autocast_if_enabled, model.hooks(fwd_hooks=hooks):
            output, _ = run_to_output(model, first.tokens, first.prefix, first_trainer.runner.site)
        kl = kl_divergence(
            first.clean_rows(rows),
            output.flatten(0, 1)[rows],
            first_trainer.runner.projection,
            cfg.kl_chunk_tokens,
        )
        losses, numbers, values = {}, {}, {}
        firing = {name: _firing_counts(out.feature_acts) for name, out in outs.items()}
        for name, trainer in self.trainers.items():
            out = outs[name]
            sae_mse = out.losses["mse_loss"]
            values[name] = {"mse": sae_mse, "kl": kl}
            losses[name], alpha = self.objective.combine(values[name], out.loss - sae_mse, sae_mse)
            l0 = firing[name].sum() / len(rows)
            numbers[name] = trainer._checked_numbers(loss=losses[name], kl=kl, alpha=alpha, l0=l0)
        torch.stack(list(losses.values())).sum().backward()
        for name, trainer in self.trainers.items():
            trainer._record_firing(firing[name], len(rows))
            trainer._optimizer_step(trainer.sae)
            trainer._advance_schedules(numbers[name]["l0"])
        return {
            name: trainer._step_output(outs[name], losses[name], values[name], numbers[name])
            for name, trainer in self.trainers.items()
        }

    def _replace_at_input(
        self,
        acts: torch.Tensor,
        hook: HookPoint,  # noqa: ARG002
        *,
        name: str,
        run: CleanRun,
        rows: torch.Tensor,
        outs: dict[str, TrainStepOutput],
    ) -> torch.Tensor:
        """Transcoder `name` on the activation this pass brings to its input hook, at `rows`."""
        trainer = self.trainers[name]
        site = trainer.runner.site
        outs[name] = trainer.replacement(trainer.sae, trainer._step_input(site.read(acts), run, rows))
        return acts

    def _write_output(
        self,
        acts: torch.Tensor,
        hook: HookPoint,  # noqa: ARG002
        *,
        name: str,
        rows: torch.Tensor,
        outs: dict[str, TrainStepOutput],
    ) -> torch.Tensor:
        site = self.trainers[name].runner.write_site
        flat = site.read(acts).flatten(0, 1).index_put((rows,), outs[name].sae_out.to(acts.dtype))
        return site.write(acts, flat.view_as(site.read(acts)))


class JointMemberTrainer(KLFinetuneTrainer):
    """A transcoder's trainer whose step is its share of the set's joint step."""

    joint: JointReplacementStep
    name: str

    def _train_step(self, sae: TrainingSAE[Any], sae_in: CleanRun) -> TrainStepOutput:  # type: ignore[override]  # noqa: ARG002
        return self.joint.output_for(self.name)


def check_joint(
    saes: Sequence[SAE[Any]], model: HookedRootModule, plans: Sequence[Plan], parallel: DataParallel
) -> None:
    """replacement='joint' trains a transcoder set as one replacement model: refuse, before any
    work, what is not one."""
    if len(saes) < 2 or any(plan.write_site == plan.site for plan in plans):
        raise ValueError(
            "replacement='joint' splices several transcoders at once; pass a list of two or more "
            "transcoders (one per layer), or leave replacement='independent'."
        )
    assert isinstance(model, HookedTransformer)  # several SAEs per pass checked that
    check_transcoder_set(saes, model)  # one per output hook, in layer order
    plain = all(type(method_of(plan.cfg, model, plan.site.hook_name)) is SAEFinetune for plan in plans)
    if parallel.world_size > 1 or not plain:
        raise ValueError(
            "replacement='joint' trains the transcoders themselves in one process (no distributed, "
            "adapter, LoRA or other method yet)."
        )
