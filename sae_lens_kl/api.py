"""`kl_finetune`: one call from SAELens SAEs and a TransformerLens model to fine-tuned SAEs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl import save_dir as owned
from sae_lens_kl.architectures import SPARSITY_COEFFICIENT
from sae_lens_kl.cache import CleanPassCache
from sae_lens_kl.checkpoints import (
    CHECKPOINTS_DIRNAME,
    common_checkpoints,
    data_fingerprint,
    starting_saes,
)
from sae_lens_kl.checks import check_lockstep, optimizer_state
from sae_lens_kl.compile_probe import decide as decide_compile
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.controller import SparsityController
from sae_lens_kl.data import DataSource, describe
from sae_lens_kl.eval_result import EvalResult
from sae_lens_kl.evaluation import HeldOutEvaluator, special_token_ids
from sae_lens_kl.joint import JointMemberTrainer, JointReplacementStep, check_joint
from sae_lens_kl.losses import Objective, objective_of
from sae_lens_kl.methods import Method, SAEFinetune, method_of
from sae_lens_kl.multi import lockstep
from sae_lens_kl.parallel import DataParallel
from sae_lens_kl.plan import Plan, make_plan
from sae_lens_kl.replacement import ReplacementSet
from sae_lens_kl.report import run_report, save_artifact
from sae_lens_kl.runs import SpliceRunner
from sae_lens_kl.splice import frozen, linear_layout
from sae_lens_kl.stability import weight_stability
from sae_lens_kl.streams import check_evaluator, data_streams, evaluator_of
from sae_lens_kl.trainer import (
    KLFinetuneTrainer,
    NonFiniteLossError,
    StepCallback,
    TrainedModule,
)


def kl_finetune(
    sae: SAE[Any] | Sequence[SAE[Any]],
    model: HookedRootModule,
    data: DataSource | None = None,
    *,
    tokens: int,
    save_dir: str | os.PathLike[str] | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    eval_data: DataSource | None = None,
    evaluator: HeldOutEvaluator | None = None,
    callbacks: Sequence[StepCallback] = (),
    start_sae: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | None] | None = None,
    **options: Any,
) -> Any:
    """Fine-tune `sae` so that splicing it into `model` changes the next-token distribution less.

    The objective is 0.5*(MSE + alpha*KL), alpha = MSE/(KL+1e-8) recomputed every batch
    (Karvonen 2025), with the SAE's own sparsity losses; Adam, lr decayed linearly to 0, gradient
    clipping 1.0. Only SAE parameters train; `model` is left bit-identical.

    `data`: a Hugging Face dataset name or object, a list of strings, a local text file or folder,
    a [n, seq] token tensor or a clean-pass cache; default the SAE metadata's dataset_path. The
    first `eval_tokens` tokens are held out (unless `eval_data` is given) for the before/after
    evaluation. `evaluator` (a `HeldOutEvaluator`, e.g. `HeldOutEvaluator.for_data(model,
    held_out_text, n_tokens=..., context_size=...)`) replaces `eval_data`/`eval_tokens` with one
    evaluator shared by several fine-tunes: the clean pass of its tokens, the zero-ablation
    baseline and the starting SAE's numbers are computed once for all of them (its settings must
    match this fine-tune's). `tokens` and the further keywords (`loss`, `lr`, `batch_size`, `context_size`,
    `eval_tokens`, ...) are fields of `KLFinetuneConfig`, with its defaults.

    A list of SAEs trains them in lockstep on the same tokens (sharing the layers before the
    earliest one and the clean pass) and returns a list, each result identical to fine-tuning that
    SAE alone; with `save_dir`, SAE i is saved in save_dir/sae_<i>.

    `start_sae`: where the starting SAE can be loaded from (a SAELens folder or RELEASE:SAE_ID; one
    per SAE for a list), recorded in the report as `start_sae` so that `sae-lens-kl saebench --sae
    after=SAVE_DIR` compares the result with it.

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
    cfg = KLFinetuneConfig(tokens=tokens, **options)
    parallel = DataParallel.of_run(cfg.distributed)
    if cfg.batch_size % parallel.world_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} is the global batch, split over {parallel.world_size} "
            "processes: pass a multiple of the number of processes."
        )
    saes = [sae] if isinstance(sae, SAE) else list(sae)
    if not saes or not all(isinstance(one, SAE) for one in saes):
        raise TypeError("kl_finetune takes an SAE or a non-empty list of SAEs.")
    starts = owned.start_sources(start_sae, len(saes))
    resume_points = _resume_points(resume_from, len(saes))
    held_out = (
        "a shared evaluator (nothing held out of the data)"
        if evaluator is not None
        else f"eval_data {data_fingerprint(eval_data)}"
        if eval_data is not None
        else None
    )
    plans = [
        make_plan(one, model, data, cfg, save_dir, resume_point, overwrite, parallel.world_size, held_out)
        for one, resume_point in zip(saes, resume_points, strict=True)
    ]
    # every rank must run the same fine-tune (also: no rank writes before all have checked)
    parallel.check_same(
        "settings, SAEs, data or folders",
        [
            # the device is each rank's own
            {**plan.cfg.to_dict(), **plan.fingerprints, "save_dir": plan.save_dir, "resume": plan.checkpoint}
            | {"device": None}
            for plan in plans
        ],
    )
    if evaluator is not None:
        check_evaluator(evaluator, model, plans[0].cfg, eval_data)
    check_lockstep(plans)
    if cfg.replacement == "joint":
        check_joint(saes, model, plans, parallel)
    for folder, start in zip(owned.member_folders(plans[0].save_dir, len(saes)), starts, strict=True):
        if folder is not None:
            owned.check_not_the_start(folder, start)
    # Nothing in the fine-tune is random, but SAELens draws an initialisation when it builds a
    # training SAE (then overwritten): the caller's generator state is left as it was.
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    # one writer per save_dir, from here (every check passed) to the artifact
    top = plans[0].save_dir
    writer_lock = owned.exclusive(top) if top is not None and parallel.is_main else nullcontext()
    # the LM's weights in the layout TransformerLens copies them into (splice.linear_layout), from
    # before the compile probe times the blocks to the evaluation after
    with writer_lock, torch.random.fork_rng(devices=cuda_devices), linear_layout(model):
        tuned = _run(saes, model, plans, eval_data, evaluator, callbacks, overwrite, parallel, starts)
    return tuned[0] if isinstance(sae, SAE) else tuned


def _resume_points(resume_from: str | os.PathLike[str] | None, count: int) -> list[Any]:
    """Where each SAE resumes: several SAEs together from the newest checkpoint all of them
    reached."""
    if count == 1 or resume_from is None:
        return [resume_from] * count
    return common_checkpoints(owned.member_folders(Path(resume_from).expanduser(), count))  # type: ignore[arg-type]


@dataclass
class _Job:
    """One SAE's fine-tune: its plan, trainer, controller and the 'before' evaluation."""

    start: SAE[Any]
    plan: Plan
    trainer: KLFinetuneTrainer
    method: Method
    controller: SparsityController | None
    before: EvalResult | None
    resumed_tokens: int
    save_dir: Path | None


def _run(
    saes: Sequence[SAE[Any]],
    model: HookedRootModule,
    plans: Sequence[Plan],
    eval_data: DataSource | None,
    shared_evaluator: HeldOutEvaluator | None,
    callbacks: Sequence[StepCallback],
    overwrite: bool,
    parallel: DataParallel,
    start_sources: Sequence[str | None],
) -> list[SAE[Any]]:
    """Fine-tune one SAE, or several in lockstep on the same tokens sharing the clean pass."""
    started = time.perf_counter()
    first = plans[0]
    cfg = first.cfg
    trainings, consumed = starting_saes(saes, plans, model)
    methods = [method_of(plan.cfg, model, plan.site.hook_name) for plan in plans]
    modules = [
        method.start(training, plan.checkpoint)
        for method, training, plan in zip(methods, trainings, plans, strict=True)
    ]
    objective = objective_of(cfg)
    # one set of compiled blocks, or none, serves every SAE (compile_probe.decide says which)
    blocks, compiling = decide_compile(
        cfg.compile_blocks,
        model,
        first.site,
        first.prefix_reuse,
        cfg.batch_size // parallel.world_size,
        first.context_size,
        cfg.tokens // (cfg.batch_size * first.context_size),
        parallel=parallel,
    )
    # SAE i is "sae_<i>": its key in every batch's clean runs (and its folder among several)
    runners = {
        name: SpliceRunner(
            model,
            plan.site,
            write_site=plan.write_site,
            prefix_reuse=plan.prefix_reuse,
            blocks=blocks,
            spliced_hooks=method.spliced_hooks(),
            spliced_from_start=method.spliced_from_start,
            checkpoint_suffix=plan.cfg.checkpoint_suffix,
        )
        for name, plan, method in zip(owned.member_names(len(plans)), plans, methods, strict=True)
    }
    eval_sequences, clean_runs = data_streams(
        first, model, runners, eval_data, consumed, objective, parallel, held_out=shared_evaluator is not None
    )
    # one evaluator for every SAE of the run: the clean pass and baseline are computed once
    evaluator = shared_evaluator or evaluator_of(first, model, eval_sequences, parallel)
    save_dirs = owned.member_folders(first.save_dir, len(saes))
    for save_dir in save_dirs:
        if save_dir is not None and parallel.is_main:
            owned.prepare(save_dir, overwrite=overwrite, resuming=first.resuming_into_save_dir)
    jobs = [
        _prepare(
            sae,
            plan,
            training,
            method,
            trained_modules,
            runner,
            objective,
            evaluator,
            callbacks,
            save_dir,
            parallel,
            JointMemberTrainer if cfg.replacement == "joint" else KLFinetuneTrainer,
        )
        for sae, plan, training, method, trained_modules, runner, save_dir in zip(
            saes, plans, trainings, methods, modules, runners.values(), save_dirs, strict=True
        )
    ]
    trainers = dict(zip(runners, (job.trainer for job in jobs), strict=True))
    if cfg.replacement == "joint":  # one spliced pass for the set; SAELens's loop drives it
        joint = JointReplacementStep(trainers)
        for name, trainer in trainers.items():
            trainer.joint, trainer.name = joint, name  # type: ignore[attr-defined]
        clean_runs = joint.batches(clean_runs)
    fitter = lockstep(trainers, clean_runs)
    plain = all(type(method) is SAEFinetune for method in methods)
    set_metrics = ReplacementSet.of(saes, model, evaluator, cfg, parallel, plain)
    train_started = time.perf_counter()
    with frozen(model), _wandb_run(cfg, first, parallel):
        fitter.fit()
    train_seconds = time.perf_counter() - train_started
    extra: dict[str, Any] = {"compile_blocks": compiling.as_dict()}
    if set_metrics is not None:
        extra["replacement_model"] = set_metrics.after([job.trainer.sae for job in jobs])
    tuned = [
        _finish(job, evaluator, train_seconds, time.perf_counter() - started, parallel, source, extra)
        for job, source in zip(jobs, start_sources, strict=True)
    ]
    parallel.barrier()  # every rank returns once rank 0 has written the artifacts
    return tuned


def _source(data: DataSource) -> str:
    """The report's name for the data: describe()'s, with a clean-pass cache's folder."""
    return f"{describe(data)} {data.path}" if isinstance(data, CleanPassCache) else describe(data)


def _prepare(
    sae: SAE[Any],
    plan: Plan,
    training: TrainingSAE[Any],
    method: Method,
    modules: list[TrainedModule],
    runner: SpliceRunner,
    objective: Objective,
    evaluator: HeldOutEvaluator | None,
    callbacks: Sequence[StepCallback],
    save_dir: Path | None,
    parallel: DataParallel,
    trainer_cls: type[KLFinetuneTrainer] = KLFinetuneTrainer,
) -> _Job:
    """The 'before' evaluation, the L0 controller and the trainer of one SAE (state restored when
    resuming)."""
    cfg = plan.cfg
    before = None if evaluator is None else evaluator(sae)
    coefficient = SPARSITY_COEFFICIENT.get(training.cfg.architecture())
    controller = None
    if (
        method.trains_sae
        and coefficient is not None
        and (cfg.sparsity_controller == "on" or (cfg.sparsity_controller == "auto" and coefficient == "l1"))
    ):
        target = cfg.target_l0 if cfg.target_l0 is not None else (before.l0 if before else None)
        controller = SparsityController(coefficient, cfg.controller_rate, target)
    trainer = trainer_cls(
        training,
        runner,
        iter(()),  # `lockstep` hands it the clean runs
        cfg,
        context_size=plan.context_size,
        objective=objective,
        special_token_ids=special_token_ids(runner.model) if cfg.exclude_special_tokens else [],
        controller=controller,
        checkpoint_dir=None if save_dir is None else save_dir / CHECKPOINTS_DIRNAME,
        fingerprints=plan.fingerprints,
        callbacks=callbacks,
        modules=modules,
        parallel=parallel,
    )
    if plan.checkpoint is not None:
        trainer.load_trainer_state(plan.checkpoint)
    elif cfg.continue_optimizer_from is not None:
        trainer.continue_optimizer(
            optimizer_state(Path(cfg.continue_optimizer_from).expanduser(), training.device)
        )
    return _Job(sae, plan, trainer, method, controller, before, trainer.n_training_samples, save_dir)


def _finish(
    job: _Job,
    evaluator: HeldOutEvaluator | None,
    train_seconds: float,
    wall_seconds: float,
    parallel: DataParallel,
    start_source: str | None,
    extra: dict[str, Any],
) -> SAE[Any]:
    """The inference SAE with its 'after' evaluation and report; saved when a folder is given."""
    trainer, controller = job.trainer, job.controller
    if controller is not None:
        final_coefficient = trainer.coefficient_schedulers[controller.coefficient_name].final_value
        setattr(trainer.sae.cfg, f"{controller.coefficient_name}_coefficient", final_coefficient)
        trainer.sae.cfg.add_training_info_to_metadata()
    tuned = job.method.result(trainer.sae)
    trained = dict(tuned.state_dict())
    for module in trainer.modules:
        trained.update({f"{module.filename}:{name}": p for name, p in module.state_dict().items()})
    for name, tensor in trained.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteLossError(
                f"The fine-tuned SAE's {name} holds non-finite values (NaN or inf); it was not saved. "
                f"Last checkpoint: {trainer.last_checkpoint or 'none saved'}. Lower lr, or check the data."
            )
    after = (
        None
        if evaluator is None
        else evaluator(tuned, trainer.runner.spliced_hooks, trainer.runner.spliced_from_start)
    )
    report = run_report(
        trainer,
        hook_name=job.plan.site.hook_name,
        prefix_reuse=job.plan.prefix_reuse,
        before=job.before,
        after=after,
        controller=controller,
        train_seconds=train_seconds,
        resumed_tokens=job.resumed_tokens,
        wall_seconds=wall_seconds,
    )
    report["weight_stability"] = weight_stability(job.start, tuned)
    report["data"] = {"source": _source(job.plan.data), "fingerprint": job.plan.fingerprints["data"]}
    report["start_sae"] = start_source
    report.update(extra)
    tuned.cfg.metadata.kl_finetune = report
    if job.save_dir is not None and parallel.is_main:
        save_artifact(tuned, trainer, report, job.save_dir)
    return tuned


@contextmanager
def _wandb_run(cfg: KLFinetuneConfig, plan: Plan, parallel: DataParallel) -> Iterator[None]:
    """A wandb run for SAELens's logger when logging is on (rank 0) and the caller has not started one."""
    if not (cfg.log_to_wandb and parallel.is_main):
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
