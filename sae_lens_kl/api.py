"""`kl_finetune`: one call from a SAELens SAE and a TransformerLens model to a fine-tuned SAE."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.constants import SPARSITY_FILENAME
from safetensors.torch import save_file
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.architectures import (
    SPARSITY_COEFFICIENT,
    to_inference_sae,
    to_training_sae,
)
from sae_lens_kl.cache import CleanPassCache, CleanRun
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.controller import SparsityController
from sae_lens_kl.data import DataError, DataSource, batched, describe, take, token_sequences
from sae_lens_kl.evaluate import EvalResult, HeldOutEvaluator, special_token_ids
from sae_lens_kl.multi import MultiKLFinetuneTrainer, shared_clean_runs
from sae_lens_kl.plan import CHECKPOINTS_DIRNAME, Plan, make_plan
from sae_lens_kl.trainer import FINETUNE_STATE_FILENAME, KLFinetuneTrainer, StepCallback

CONFIG_FILENAME = "kl_finetune_config.json"
METRICS_FILENAME = "kl_finetune_metrics.json"


def kl_finetune(
    sae: SAE[Any] | Sequence[SAE[Any]],
    model: HookedRootModule,
    data: DataSource | None = None,
    *,
    tokens: int,
    loss: str = "kl+mse",
    lr: float = 5e-5,
    batch_size: int = 2,
    context_size: int | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    eval_tokens: int = 65_536,
    seed: int = 0,
    overwrite: bool = False,
    eval_data: DataSource | None = None,
    callbacks: Sequence[StepCallback] = (),
    **options: Any,
) -> Any:
    """Fine-tune `sae` so that splicing it into `model` changes the next-token distribution less.

    The objective is 0.5*(MSE + alpha*KL), alpha = MSE/(KL+1e-8) recomputed every batch
    (Karvonen 2025), with the SAE's own sparsity losses; Adam, lr decayed linearly to 0, gradient
    clipping 1.0. Only SAE parameters train; `model` is left bit-identical.

    `data`: a Hugging Face dataset name or object, a list of strings, a local text file or folder,
    or a [n, seq] token tensor; default the SAE metadata's dataset_path. The first `eval_tokens`
    tokens are held out (unless `eval_data` is given) for the before/after evaluation.
    Further keywords are fields of `KLFinetuneConfig`.

    A list of SAEs trains them in lockstep on the same tokens (sharing the layers before the
    earliest one and the clean pass) and returns a list, each result identical to fine-tuning that
    SAE alone; with `save_dir`, SAE i is saved in save_dir/sae_<i>.

    Returns an inference SAE of the same family (usable in HookedSAETransformer, run_evals, ...).
    With `save_dir`, also writes a SAELens folder there (cfg.json, sae_weights.safetensors,
    sparsity.safetensors) plus the fine-tune config and before/after metrics, and resumable
    checkpoints under save_dir/checkpoints.
    """
    known = {f.name for f in fields(KLFinetuneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"kl_finetune got unknown options {unknown}; see KLFinetuneConfig for {sorted(known)}."
        )
    cfg = KLFinetuneConfig(
        tokens=tokens,
        loss=loss,
        lr=lr,
        batch_size=batch_size,
        context_size=context_size,  # type: ignore[arg-type]
        eval_tokens=eval_tokens,
        seed=seed,
        **options,
    )
    if isinstance(sae, SAE):
        plan = make_plan(sae, model, data, cfg, save_dir, resume_from, overwrite)
        return _run(sae, model, plan, eval_data, callbacks)
    saes = list(sae)
    if not saes or not all(isinstance(one, SAE) for one in saes):
        raise TypeError("kl_finetune takes an SAE or a non-empty list of SAEs.")
    if resume_from is not None:
        raise ValueError(
            "resume_from resumes one SAE's run; resume each SAE of a multi-SAE run on its own "
            "from save_dir/sae_<i>."
        )
    plans = [make_plan(one, model, data, cfg, save_dir, None, overwrite) for one in saes]
    if not all(p.prefix_reuse for p in plans) or isinstance(plans[0].data, CleanPassCache):
        raise ValueError(
            "Several SAEs per pass need a HookedTransformer, prefix_reuse=True and token data "
            "(fine-tune from a clean-pass cache one SAE at a time)."
        )
    return _run_many(saes, model, plans, eval_data, callbacks)


@contextmanager
def frozen(model: HookedRootModule) -> Iterator[None]:
    """No gradients for the LM's weights while the SAE trains; flags restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@dataclass
class _Job:
    """One SAE's fine-tune: its plan, trainer, controller and the 'before' evaluation."""

    sae: SAE[Any]
    plan: Plan
    trainer: KLFinetuneTrainer
    controller: SparsityController | None
    before: EvalResult | None
    resumed_tokens: int


def _prepare(
    sae: SAE[Any],
    model: HookedRootModule,
    plan: Plan,
    training: TrainingSAE[Any],
    batches: Iterator[Any],
    evaluator: HeldOutEvaluator | None,
    callbacks: Sequence[StepCallback],
    save_dir: Path | None,
) -> _Job:
    cfg = plan.cfg
    before = None if evaluator is None else evaluator(sae)
    coefficient = SPARSITY_COEFFICIENT.get(training.cfg.architecture())
    controller = None
    if coefficient is not None and (
        cfg.sparsity_controller == "on" or (cfg.sparsity_controller == "auto" and coefficient == "l1")
    ):
        target = cfg.target_l0 if cfg.target_l0 is not None else (before.l0 if before else None)
        controller = SparsityController(coefficient, cfg.controller_rate, target)
    trainer = KLFinetuneTrainer(
        training,
        model,
        batches,
        cfg,
        site=plan.site,
        context_size=plan.context_size,
        prefix_reuse=plan.prefix_reuse,
        special_token_ids=special_token_ids(model) if cfg.exclude_special_tokens else [],
        controller=controller,
        checkpoint_dir=None if save_dir is None else save_dir / CHECKPOINTS_DIRNAME,
        callbacks=callbacks,
    )
    if plan.checkpoint is not None:
        trainer.load_trainer_state(plan.checkpoint)
    return _Job(sae, plan, trainer, controller, before, trainer.n_training_samples)


def _finish(
    job: _Job,
    evaluator: HeldOutEvaluator | None,
    train_seconds: float,
    wall_seconds: float,
    save_dir: Path | None,
) -> SAE[Any]:
    trainer, controller = job.trainer, job.controller
    if controller is not None:
        final_coefficient = trainer.coefficient_schedulers[controller.coefficient_name].final_value
        setattr(trainer.sae.cfg, f"{controller.coefficient_name}_coefficient", final_coefficient)
        trainer.sae.cfg.add_training_info_to_metadata()
    tuned = to_inference_sae(trainer.sae)
    after = None if evaluator is None else evaluator(tuned)
    report = _report(
        job.plan.cfg,
        job.plan,
        job.before,
        after,
        trainer,
        controller,
        train_seconds,
        job.resumed_tokens,
        wall_seconds,
    )
    tuned.cfg.metadata.kl_finetune = report
    if save_dir is not None:
        _save_artifact(tuned, trainer, report, save_dir)
    return tuned


def _evaluator(
    plan: Plan, model: HookedRootModule, eval_sequences: torch.Tensor | None
) -> HeldOutEvaluator | None:
    if eval_sequences is None:
        return None
    cfg = plan.cfg
    return HeldOutEvaluator(
        model,
        eval_sequences,
        batch_size=cfg.eval_batch_size,
        special_token_ids=special_token_ids(model) if cfg.exclude_special_tokens else [],
        exclude_first_positions=cfg.exclude_first_positions,
        chunk_tokens=cfg.kl_chunk_tokens,
        prefix_reuse=plan.prefix_reuse,
    )


def _training_batches(plan: Plan, batches: Iterator[Any], n_eval_seq: int) -> Iterator[Any]:
    first = next(batches, None)
    if first is None:
        raise DataError(
            f"The data ({describe(plan.data)}) has no training batch of {plan.cfg.batch_size} x "
            f"{plan.context_size} tokens after the {n_eval_seq} held-out sequences; pass more "
            "data or lower eval_tokens."
        )
    return _exhaustion_guarded(itertools.chain([first], batches), plan.cfg, plan)


def _device(plan: Plan, model: HookedRootModule) -> torch.device:
    return torch.device(plan.cfg.device) if plan.cfg.device else next(model.parameters()).device


def _run(
    sae: SAE[Any],
    model: HookedRootModule,
    plan: Plan,
    eval_data: DataSource | None,
    callbacks: Sequence[StepCallback],
) -> SAE[Any]:
    started = time.perf_counter()
    torch.manual_seed(plan.cfg.seed)
    consumed = 0
    if plan.checkpoint is not None:
        training = TrainingSAE.load_from_disk(plan.checkpoint, device=str(_device(plan, model)))
        state = json.loads((plan.checkpoint / FINETUNE_STATE_FILENAME).read_text())
        consumed = state["train_sequences_consumed"]
    else:
        training = to_training_sae(sae, plan.cfg.sparsity_coefficient).to(_device(plan, model))
    eval_sequences, batches = _data_streams(plan, model, eval_data, consumed)
    n_eval_seq = 0 if eval_sequences is None else len(eval_sequences)
    batches = _training_batches(plan, batches, n_eval_seq)
    evaluator = _evaluator(plan, model, eval_sequences)
    job = _prepare(sae, model, plan, training, batches, evaluator, callbacks, plan.save_dir)
    train_started = time.perf_counter()
    with frozen(model), _wandb_run(plan.cfg, plan):
        job.trainer.fit()
    train_seconds = time.perf_counter() - train_started
    return _finish(job, evaluator, train_seconds, time.perf_counter() - started, plan.save_dir)


def _run_many(
    saes: Sequence[SAE[Any]],
    model: HookedRootModule,
    plans: Sequence[Plan],
    eval_data: DataSource | None,
    callbacks: Sequence[StepCallback],
) -> list[SAE[Any]]:
    """Several SAEs in lockstep on the same tokens, sharing the prefix and the clean pass."""
    started = time.perf_counter()
    first = plans[0]
    torch.manual_seed(first.cfg.seed)
    trainings = [
        to_training_sae(sae, p.cfg.sparsity_coefficient).to(_device(p, model))
        for sae, p in zip(saes, plans, strict=True)
    ]
    eval_sequences, token_batches = _data_streams(first, model, eval_data, 0)
    n_eval_seq = 0 if eval_sequences is None else len(eval_sequences)
    token_batches = _training_batches(first, token_batches, n_eval_seq)
    evaluator = _evaluator(first, model, eval_sequences)  # one baseline per hook, shared
    names = [f"sae_{index}" for index in range(len(saes))]
    save_dirs = [None if first.save_dir is None else first.save_dir / name for name in names]
    jobs = {
        name: _prepare(sae, model, plan, training, iter(()), evaluator, callbacks, save_dir)
        for name, sae, plan, training, save_dir in zip(names, saes, plans, trainings, save_dirs, strict=True)
    }
    assert isinstance(model, HookedTransformer)
    sites = {name: job.plan.site for name, job in jobs.items()}
    blocks = next(iter(jobs.values())).trainer.blocks  # one compiled set serves every SAE
    runs = shared_clean_runs(model, token_batches, sites, blocks, first.cfg.kl_chunk_tokens)
    coordinator = MultiKLFinetuneTrainer({name: job.trainer for name, job in jobs.items()}, runs)
    train_started = time.perf_counter()
    with frozen(model), _wandb_run(first.cfg, first):
        coordinator.fit()
    train_seconds = time.perf_counter() - train_started
    return [
        _finish(job, evaluator, train_seconds, time.perf_counter() - started, save_dir)
        for job, save_dir in zip(jobs.values(), save_dirs, strict=True)
    ]


def _data_streams(
    plan: Plan, model: HookedRootModule, eval_data: DataSource | None, consumed: int
) -> tuple[torch.Tensor | None, Iterator[torch.Tensor | CleanRun]]:
    """(held-out evaluation sequences, training batches after the `consumed` sequences). Held-out
    sequences come first in the stream unless `eval_data` is given; training follows them."""
    cfg = plan.cfg
    n_eval_seq = -(-cfg.eval_tokens // plan.context_size)
    described = describe(eval_data if eval_data is not None else plan.data)
    too_short = DataError(
        f"The {'evaluation ' if eval_data is not None else ''}data ({described}) holds fewer than "
        f"{n_eval_seq} sequences of {plan.context_size} tokens for eval_tokens={cfg.eval_tokens}; "
        "lower eval_tokens or pass more data."
    )
    eval_sequences = None
    if eval_data is not None and n_eval_seq:
        eval_sequences = take(
            token_sequences(eval_data, model, plan.context_size, plan.prepend_bos), n_eval_seq
        )
        if eval_sequences is None:
            raise too_short
    if isinstance(plan.data, CleanPassCache):
        held_out = 0
        if eval_data is None and n_eval_seq:
            eval_sequences, held_out = plan.data.tokens(n_eval_seq), n_eval_seq
            if len(eval_sequences) < n_eval_seq:
                raise too_short
        # The cache is read epoch after epoch until the token budget is spent.
        return eval_sequences, plan.data.runs(cfg.batch_size, held_out, consumed)
    sequences = token_sequences(plan.data, model, plan.context_size, plan.prepend_bos)
    if eval_data is None and n_eval_seq:
        eval_sequences = take(sequences, n_eval_seq)
        if eval_sequences is None:
            raise too_short
    return eval_sequences, batched(itertools.islice(sequences, consumed, None), cfg.batch_size)


@contextmanager
def _wandb_run(cfg: KLFinetuneConfig, plan: Plan) -> Iterator[None]:
    """A wandb run for SAELens's logger when logging is on and the caller has not started one."""
    if not cfg.log_to_wandb:
        yield
        return
    import wandb

    own_run = wandb.run is None
    if own_run:
        wandb.init(project=cfg.wandb_project, config={**cfg.to_dict(), "hook_name": plan.site.hook_name})
    try:
        yield
    finally:
        if own_run:
            wandb.finish()


def _exhaustion_guarded(
    batches: Iterator[torch.Tensor], cfg: KLFinetuneConfig, plan: Plan
) -> Iterator[torch.Tensor]:
    """Token batches; running out before the budget is an error naming both numbers."""
    steps_needed = cfg.tokens // (cfg.batch_size * plan.context_size)
    for served, batch in enumerate(batches, start=1):
        yield batch
        if served == steps_needed:
            return
    raise DataError(
        f"The data ({describe(plan.data)}) ran out before the token budget tokens="
        f"{cfg.tokens}. Checkpoints written so far are kept; pass more data and "
        "resume_from, or lower tokens."
    )


def _report(
    cfg: KLFinetuneConfig,
    plan: Plan,
    before: EvalResult | None,
    after: EvalResult | None,
    trainer: KLFinetuneTrainer,
    controller: SparsityController | None,
    train_seconds: float,
    resumed_tokens: int,
    wall_seconds: float,
) -> dict[str, Any]:
    trained_now = trainer.n_training_samples - resumed_tokens
    report: dict[str, Any] = {
        "config": {
            **cfg.to_dict(),
            "context_size": plan.context_size,
            "prepend_bos": plan.prepend_bos,
        },
        "hook_name": plan.site.hook_name,
        "training_tokens": trainer.n_training_samples,
        "steps": trainer.n_training_steps,
        "train_seconds": train_seconds,
        "train_tokens_per_second": trained_now / train_seconds if train_seconds > 0 else None,
        "wall_seconds": wall_seconds,
        "prefix_reuse": plan.prefix_reuse,
        "before": before.to_dict() if before else None,
        "after": after.to_dict() if after else None,
        "fraction_ce_gap_closed": None,
    }
    if before and after and before.ce_gap != 0:
        report["fraction_ce_gap_closed"] = (before.ce_gap - after.ce_gap) / before.ce_gap
    if controller is not None:
        scheduler = trainer.coefficient_schedulers[controller.coefficient_name]
        report["sparsity_controller"] = controller.state_dict(scheduler)
    return report


def _save_artifact(
    tuned: SAE[Any], trainer: KLFinetuneTrainer, report: dict[str, Any], save_dir: Path
) -> None:
    """Write the SAELens folder next to save_dir, then move each file in with an atomic rename."""
    save_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=save_dir, prefix=".partial-final-"))
    try:
        tuned.save_model(staging)
        save_file({"sparsity": trainer.log_feature_sparsity}, staging / SPARSITY_FILENAME)
        (staging / CONFIG_FILENAME).write_text(json.dumps(report["config"], indent=2))
        (staging / METRICS_FILENAME).write_text(json.dumps(report, indent=2))
        for path in staging.iterdir():
            os.replace(path, save_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
