"""What a fine-tune reads: the held-out sequences and its evaluator, and the training batches as
clean runs (online, from a clean-pass cache, or one clean pass shared by several SAEs), this
process's part of each."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.cache import CleanPassCache
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.data import DataSource, batched, budgeted, held_out_and_training
from sae_lens_kl.evaluation import HeldOutEvaluator, special_token_ids
from sae_lens_kl.losses import Objective, needs_spliced_run, recorded_hooks
from sae_lens_kl.parallel import DataParallel
from sae_lens_kl.plan import Plan
from sae_lens_kl.runs import SpliceRunner, shared_clean_runs


def data_streams(
    plan: Plan,
    model: HookedRootModule,
    runners: dict[str, SpliceRunner],
    eval_data: DataSource | None,
    consumed: int,
    objective: Objective,
    parallel: DataParallel,
    held_out: bool = False,
) -> tuple[torch.Tensor | None, Iterator[Any]]:
    """(held-out evaluation sequences, the clean runs of the training batches: per batch, each
    SAE's CleanRun by its runner's name; this rank's part of each batch).
    `held_out`: an evaluator was given, so no sequences are held out of the data."""
    cfg = plan.cfg
    n_eval_sequences = 0 if held_out else -(-cfg.eval_tokens // plan.context_size)
    steps = cfg.tokens // (cfg.batch_size * plan.context_size)
    streams = {"context_size": plan.context_size, "prepend_bos": plan.prepend_bos, "consumed": 0}
    if isinstance(plan.data, CleanPassCache):
        cache, held_out, eval_sequences = plan.data, 0, None
        if eval_data is not None:
            eval_sequences, _ = held_out_and_training(
                eval_data,
                None,
                model,
                n_eval_sequences=n_eval_sequences,
                **streams,  # type: ignore[arg-type]
            )
        elif n_eval_sequences:
            eval_sequences, held_out = cache.tokens(n_eval_sequences), n_eval_sequences
        # The cache is read epoch after epoch until the token budget is spent.
        ((name, runner),) = runners.items()
        runs = cache.runs(runner, cfg.batch_size, held_out, consumed, part=parallel.part)
        return eval_sequences, ({name: run} for run in budgeted(runs, steps, cache.path, cfg.tokens))
    eval_sequences, sequences = held_out_and_training(
        plan.data,
        eval_data,
        model,
        n_eval_sequences=n_eval_sequences,
        **{**streams, "consumed": consumed},  # type: ignore[arg-type]
    )
    batches = budgeted(map(parallel.part, batched(sequences, cfg.batch_size)), steps, plan.data, cfg.tokens)
    if len(runners) == 1:  # its own clean pass, stopping at the SAE's block where no term needs more
        ((name, runner),) = runners.items()
        runs = runner.clean_runs(batches, needs_spliced_run(objective), recorded_hooks(objective))
        return eval_sequences, ({name: run} for run in runs)
    assert isinstance(model, HookedTransformer)
    return eval_sequences, shared_clean_runs(model, batches, runners, cfg.kl_chunk_tokens)


def check_evaluator(
    evaluator: HeldOutEvaluator, model: HookedRootModule, cfg: KLFinetuneConfig, eval_data: DataSource | None
) -> None:
    """A shared evaluator must measure what this fine-tune's own would: same model, positions."""
    if eval_data is not None:
        raise ValueError(
            "Pass eval_data or evaluator, not both: the evaluator holds its own held-out tokens."
        )
    if evaluator.model is not model:
        raise ValueError("The evaluator was built for another model object; build it for this model.")
    ignored = special_token_ids(model) if cfg.exclude_special_tokens else []
    settings = {
        "exclude_first_positions": (evaluator.exclude_first_positions, cfg.exclude_first_positions),
        "special tokens left out": (sorted(evaluator.special_token_ids), sorted(ignored)),
    }
    for name, (theirs, ours) in settings.items():
        if theirs != ours:
            raise ValueError(
                f"The evaluator's {name} is {theirs} but this fine-tune's is {ours}; build the "
                "evaluator with the fine-tune's settings (HeldOutEvaluator.for_data(...))."
            )


def evaluator_of(
    plan: Plan, model: HookedRootModule, eval_sequences: torch.Tensor | None, parallel: DataParallel
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
        parallel=parallel,
    )
