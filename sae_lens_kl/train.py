"""An ordinary SAELens training run whose last tokens switch to the KL+MSE phase (the paper's
recipe: MSE on shuffled activations for most of the budget, then `kl_finetune` on the rest), or
KL+MSE from the first token ("end-to-end") through the same path."""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TrainingSAE,
)
from sae_lens.constants import TRAINER_STATE_FILENAME
from sae_lens.registry import get_sae_training_class
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer

from sae_lens_kl.api import kl_finetune
from sae_lens_kl.config import EVAL_TOKENS
from sae_lens_kl.data import DataError, DataSource, documents, take, token_sequences
from sae_lens_kl.splice import linear_layout
from sae_lens_kl.trainer import StepCallback


@dataclasses.dataclass
class TrainResult:
    mse_sae: TrainingSAE[Any] | None
    """The SAE at the end of the MSE phase (None for end-to-end training)."""
    sae: SAE[Any]
    """The final inference SAE, after the KL+MSE phase."""
    mse_tokens: int
    kl_tokens: int
    kl_data: Any
    """The token sequences of the KL phase (for an MSE-only control on the same tokens)."""
    eval_data: Any
    """The held-out evaluation data used before and after."""


def as_hf_dataset(data: DataSource) -> datasets.Dataset | datasets.IterableDataset:
    """SAELens's ActivationsStore reads Hugging Face datasets; wrap local text the same way
    `kl_finetune` reads it (one document per file or string)."""
    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        return data
    texts = list(documents(data))
    if texts and not isinstance(texts[0], str):
        return datasets.Dataset.from_dict({"tokens": [t.tolist() for t in texts]})
    return datasets.Dataset.from_dict({"text": texts})


def mse_phase(
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    model: HookedTransformer,
    data: DataSource,
    mse_tokens: int,
    checkpoint_dir: Path | None = None,
    b_dec_init: str = "zeros",
) -> TrainingSAE[Any]:
    """SAELens's own runner: MSE on shuffled activations for `mse_tokens` tokens. With
    `checkpoint_dir`, the runner also writes its final checkpoint (Adam state included) under it
    (`final_checkpoint` finds it). `b_dec_init="mean"` starts the decoder bias at the mean of the
    first training batch's activations instead of SAELens's zeros."""
    _check_b_dec_init(b_dec_init, runner_cfg)
    dataset = as_hf_dataset(data)
    checkpoints = (
        {}
        if checkpoint_dir is None
        else {"checkpoint_path": str(checkpoint_dir), "save_final_checkpoint": True}
    )
    cfg = dataclasses.replace(
        runner_cfg,
        training_tokens=mse_tokens,
        is_dataset_tokenized="tokens" in (dataset.column_names or []),
        **checkpoints,
    )
    # The runner's SAE initialisation and activation shuffling draw from torch's global generator:
    # seed it for them, and leave the caller's state as it was.
    with torch.random.fork_rng(devices=[]), linear_layout(model):
        torch.manual_seed(cfg.seed)
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
        _start_b_dec(runner, b_dec_init)
        return runner.run()


def _check_b_dec_init(b_dec_init: str, runner_cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    if b_dec_init not in ("zeros", "mean"):
        raise ValueError(f"b_dec_init={b_dec_init!r}: pass 'zeros' or 'mean'.")
    if b_dec_init == "mean" and runner_cfg.sae.normalize_activations != "none":
        raise ValueError(
            "b_dec_init='mean' needs normalize_activations='none' (the mean is of raw activations); "
            "pass b_dec_init='zeros' with normalisation."
        )


def _start_b_dec(runner: LanguageModelSAETrainingRunner, b_dec_init: str) -> None:
    """b_dec at the mean of the runner's first training batch for b_dec_init='mean'. sae-lens 6.54
    starts it at zero and has no option for it (v5's b_dec_init_method is gone): a residual stream
    with a large mean then reaches every latent's pre-activation alike (docs/demo.md, Gemma)."""
    if b_dec_init == "mean":
        with torch.no_grad():
            first = next(iter(runner.activations_store))
            runner.sae.b_dec.copy_(first.to(runner.sae.b_dec.dtype).mean(0))


def final_checkpoint(checkpoint_dir: Path) -> Path:
    """The folder of the final checkpoint `mse_phase` wrote under `checkpoint_dir` (SAELens adds a
    run id and names it final_<tokens>)."""
    (state,) = checkpoint_dir.rglob(f"final_*/{TRAINER_STATE_FILENAME}")
    return state.parent


def fresh_sae(
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    model: HookedTransformer,
    data: DataSource,
    b_dec_init: str = "zeros",
) -> TrainingSAE[Any]:
    """The SAE SAELens's runner would start from (initialised from runner_cfg.seed; b_dec as
    `mse_phase` starts it), with the metadata it would record."""
    _check_b_dec_init(b_dec_init, runner_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(runner_cfg.seed)
        runner = LanguageModelSAETrainingRunner(
            runner_cfg, override_dataset=as_hf_dataset(data), override_model=model
        )
        _start_b_dec(runner, b_dec_init)
    # sae-lens 6.54 sets the metadata only inside run() and has no public seam for it
    # (tests/test_sae_lens_seams.py checks the fields)
    runner._set_sae_metadata()
    return runner.sae


def train_with_kl_phase(
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    model: HookedTransformer,
    data: DataSource,
    *,
    kl_fraction: float = 0.05,
    eval_data: DataSource | None = None,
    save_dir: Path | None = None,
    mse_sae: TrainingSAE[Any] | None = None,
    continue_optimizer: bool = False,
    callbacks: Sequence[StepCallback] = (),
    b_dec_init: str = "zeros",
    **kl_options: Any,
) -> TrainResult:
    """Train an SAE with SAELens for (1 - kl_fraction) of `runner_cfg.training_tokens`, then
    fine-tune it with KL+MSE on the following `kl_fraction` of the token stream.

    kl_fraction=1.0 trains end to end (KL+MSE from SAELens's initialisation). Pass `mse_sae` to
    reuse a cached MSE phase. `kl_options` go to `kl_finetune` (loss, lr, batch_size, ...).

    `continue_optimizer=True` is the paper's A.1 recipe: one Adam and one constant lr for both
    phases (the KL phase continues the MSE phase's Adam state, at `runner_cfg.lr` unless `lr` is
    given), where the default starts the KL phase with a fresh Adam and its own decaying lr (the
    paper's recipe for fine-tuning a pretrained SAE). It needs the MSE phase trained here at a
    constant lr (no `mse_sae`, no lr warm-up or decay in `runner_cfg`). `b_dec_init`: where the
    SAE trained here starts its decoder bias (`mse_phase`).
    """
    if not 0 < kl_fraction <= 1:
        raise ValueError(f"kl_fraction={kl_fraction} must lie in (0, 1].")
    _check_b_dec_init(b_dec_init, runner_cfg)
    total = runner_cfg.training_tokens
    kl_tokens = round(total * kl_fraction)
    mse_tokens = total - kl_tokens
    if continue_optimizer:
        _check_continuable(runner_cfg, mse_sae, mse_tokens)
    with tempfile.TemporaryDirectory(prefix="mse-phase-") as checkpoint_dir:
        if continue_optimizer:
            mse_sae = mse_phase(runner_cfg, model, data, mse_tokens, Path(checkpoint_dir), b_dec_init)
            kl_options = {
                "lr": runner_cfg.lr,
                "lr_schedule": "constant",
                **kl_options,
                "continue_optimizer_from": str(final_checkpoint(Path(checkpoint_dir))),
            }
        return _kl_phase(
            runner_cfg,
            model,
            data,
            mse_tokens,
            kl_tokens,
            mse_sae,
            eval_data,
            save_dir,
            callbacks,
            kl_options,
            b_dec_init,
        )


def _check_continuable(
    runner_cfg: LanguageModelSAERunnerConfig[Any], mse_sae: TrainingSAE[Any] | None, mse_tokens: int
) -> None:
    if mse_sae is not None:
        raise ValueError(
            "continue_optimizer=True continues the optimizer of the MSE phase it trains, but mse_sae "
            "was given (its optimizer is gone); pass no mse_sae."
        )
    if mse_tokens == 0:
        raise ValueError("continue_optimizer=True needs an MSE phase (kl_fraction < 1).")
    if runner_cfg.sae.normalize_activations != "none":
        raise ValueError(
            f"continue_optimizer=True with normalize_activations={runner_cfg.sae.normalize_activations!r}: "
            "the MSE phase's Adam moments are for the normalised weights, which SAELens rescales when "
            "it folds the factor in at the end; use normalize_activations='none' for the A.1 recipe."
        )
    if runner_cfg.lr_decay_steps or runner_cfg.lr_warm_up_steps:
        raise ValueError(
            f"continue_optimizer=True runs both phases at one constant lr (the paper's A.1), but the "
            f"runner config warms up for {runner_cfg.lr_warm_up_steps} steps and decays over "
            f"{runner_cfg.lr_decay_steps}; set lr_warm_up_steps=0 and lr_decay_steps=0."
        )


def _kl_phase(
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    model: HookedTransformer,
    data: DataSource,
    mse_tokens: int,
    kl_tokens: int,
    mse_sae: TrainingSAE[Any] | None,
    eval_data: DataSource | None,
    save_dir: Path | None,
    callbacks: Sequence[StepCallback],
    kl_options: dict[str, Any],
    b_dec_init: str = "zeros",
) -> TrainResult:
    """`kl_finetune` from `mse_sae` (or SAELens's initialisation) on the KL phase's tokens."""
    if mse_sae is None:
        mse_sae = (
            mse_phase(runner_cfg, model, data, mse_tokens, b_dec_init=b_dec_init) if mse_tokens > 0 else None
        )
    start = mse_sae if mse_sae is not None else fresh_sae(runner_cfg, model, data, b_dec_init)
    context_size = runner_cfg.context_size
    kl_sequences, stream = kl_phase_sequences(runner_cfg, model, data, mse_tokens, kl_tokens, b_dec_init)
    n_seq = len(kl_sequences)
    if eval_data is None and kl_options.get("evaluator") is None:
        # Held out: the sequences after the KL phase's, never trained on by either phase.
        eval_tokens = kl_options.get("eval_tokens", EVAL_TOKENS)
        eval_data = take(stream, -(-eval_tokens // context_size)) if eval_tokens else None
        if eval_tokens and eval_data is None:
            raise DataError(
                "The training data has no sequences left for the held-out evaluation; pass "
                "eval_data or more data, or eval_tokens=0."
            )
    tuned = kl_finetune(
        start,
        model,
        kl_sequences,
        tokens=n_seq * context_size,
        eval_data=eval_data,
        save_dir=save_dir,
        callbacks=callbacks,
        **kl_options,
    )
    return TrainResult(
        mse_sae=mse_sae,
        sae=tuned,
        mse_tokens=mse_tokens,
        kl_tokens=n_seq * context_size,
        kl_data=kl_sequences,
        eval_data=eval_data,
    )


def kl_phase_sequences(
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    model: HookedTransformer,
    data: DataSource,
    mse_tokens: int,
    kl_tokens: int,
    b_dec_init: str = "zeros",
    skip_tokens: int = 0,
) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """The KL phase's token sequences [n, context_size]: those after every sequence an MSE phase of
    `mse_tokens` (SAELens's runner, `mse_phase` with `b_dec_init`) reads (`mse_phase_sequences`),
    so that the KL phase trains on no token the MSE phase saw, and after `skip_tokens` more (an
    earlier seed's KL phase); and the stream of the sequences after them."""
    context_size = runner_cfg.context_size
    skip = mse_phase_sequences(runner_cfg, model, data, mse_tokens, b_dec_init) if mse_tokens > 0 else 0
    skip = None if skip is None else skip - (-skip_tokens // context_size)
    n_seq = -(-kl_tokens // context_size)
    stream = token_sequences(data, model, context_size, runner_cfg.prepend_bos)
    kl_sequences = None if skip is None else take(itertools.islice(stream, skip, None), n_seq)
    if kl_sequences is None:
        needed = "the" if skip is None else f"the {skip + n_seq:,}"
        raise DataError(
            f"The training data holds fewer than {needed} sequences of {context_size} tokens that the "
            "MSE phase (with what its mixing buffer reads ahead) and the KL phase after it read; pass "
            "more data or lower training_tokens."
        )
    return kl_sequences, stream


def mse_phase_sequences(
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    model: HookedTransformer,
    data: DataSource,
    mse_tokens: int,
    b_dec_init: str = "zeros",
) -> int | None:
    """How many token sequences SAELens's store reads in an MSE phase of `mse_tokens` tokens
    (`mse_phase`), or None when the data holds fewer (SAELens would start a second epoch).

    More than the phase trains on: sae-lens 6.54.12's mixing buffer (`mixing_buffer`) reads
    `store_batch_size_prompts` sequences at a time, keeps each one's activations inside
    `seqpos_slice` that are not special tokens, and once it holds `n_batches_in_buffer` x the
    training context activations shuffles them, serves all but `activations_mixing_fraction` of
    them in whole batches and keeps the rest; the phase draws one batch per step, one more for
    b_dec_init='mean' and the norm estimate's with normalize_activations. The demo's MSE phase
    reads 1,808 sequences of 128 tokens where its 184,320 tokens fill 1,440: a KL phase starting
    at sequence 1,440 (as before December 6) had about 42 % of its activations trained on by the
    MSE phase (docs/experiments.md). Exact for text, and for token rows that are already
    sequences of `context_size` (BOS first with prepend_bos), which SAELens reads as they are and
    `token_sequences` leaves as they are; other token rows SAELens cuts where `token_sequences`
    packs, so the count is then approximate.
    """
    unreplayed = {
        name: getattr(runner_cfg, name)
        for name, default in (
            ("use_cached_activations", False),
            ("use_chat_formatting", False),
            ("disable_concat_sequences", False),
            ("sequence_separator_token", "bos"),
            ("prefetch_llm_batches", False),
        )
        if getattr(runner_cfg, name, default) != default
    }
    if unreplayed:
        raise ValueError(
            f"The MSE phase's config sets {unreplayed}, which change what SAELens's store reads in ways "
            "mse_phase_sequences does not replay (so where a KL phase after it may start); use "
            "SAELens's defaults for them (train.runner_config does)."
        )
    context_size = runner_cfg.context_size
    kept_positions = slice(*runner_cfg.seqpos_slice)
    training_context = len(range(context_size)[kept_positions])
    excluded = runner_cfg.exclude_special_tokens
    if excluded is True:
        excluded = get_special_token_ids(model.tokenizer)  # type: ignore[arg-type]
    excluded_ids = torch.tensor(list(excluded) if excluded else [], dtype=torch.long)
    buffer = runner_cfg.n_batches_in_buffer * training_context
    mixing = int(buffer * runner_cfg.activations_mixing_fraction)
    batch = runner_cfg.train_batch_size_tokens
    batches = -(-mse_tokens // batch) + (b_dec_init == "mean")
    if runner_cfg.sae.normalize_activations in ("expected_average_only_in", "covariance_whitening"):
        batches += runner_cfg.n_batches_for_norm_estimate
    stream = token_sequences(data, model, context_size, runner_cfg.prepend_bos)
    held = served = read = 0
    while served < batches:
        loaded = list(itertools.islice(stream, runner_cfg.store_batch_size_prompts))
        if len(loaded) < runner_cfg.store_batch_size_prompts:
            return None
        read += len(loaded)
        held += sum(int((~torch.isin(tokens[kept_positions], excluded_ids)).sum()) for tokens in loaded)
        if held >= buffer:
            serving = max(1, (held - mixing) // batch)
            held, served = held - serving * batch, served + serving
    return read


NORM_ESTIMATE_BATCHES = 50


MIXING_BUFFER_SEQUENCES = 512
"""Sequences whose activations SAELens's mixing buffer shuffles together in an MSE phase (the
65,536 tokens its config reports for 32 batches of 16 prompts of 128). Measured on the demo's SAE
(benchmarks/mixing_buffer.py): mixing 512 sequences instead of the 32 that sae-lens 6.54.12 mixes
for those settings makes the held-out CE gap 24.8 % [18.5, 30.8] smaller."""


def mixing_buffer_sequences(tokens: int, context_size: int, sink_positions: int, batch_tokens: int) -> int:
    """The mixing buffer's size in sequences: MIXING_BUFFER_SEQUENCES, or the run's own sequences
    when fewer (a buffer larger than the run only reads tokens it never serves), and at least one
    training batch."""
    per_sequence = context_size - sink_positions
    run_sequences = tokens // per_sequence
    return max(min(MIXING_BUFFER_SEQUENCES, run_sequences), -(-batch_tokens // per_sequence))


def runner_config(
    model: Any,
    hook: str,
    *,
    architecture: str,
    d_sae: int,
    k: float,
    tokens: int,
    context_size: int,
    lr: float,
    batch_tokens: int,
    sink_positions: int,
    dataset_name: str,
    seed: int = 42,
    dead_feature_window: int | None = None,
    lr_decay_fraction: float = 0.0,
    normalize_activations: str = "none",
    l1_coefficient: float | None = None,
) -> LanguageModelSAERunnerConfig[Any]:
    """A SAELens runner config for an SAE of `architecture` at `hook` of `model`, with the settings
    this package's MSE phases use: BOS per sequence, special tokens and the first `sink_positions`
    positions left out, no checkpoints or output folders (the caller saves), no wandb. `seed`
    seeds the runner's SAE initialisation and activation shuffling (42: the demo's MSE phase).
    `dead_feature_window`: steps without firing after which a latent counts as dead (and TopK's
    aux-k loss revives it); default 5 % of the run's steps, since SAELens's 1,000 steps exceed a
    short run and leave the aux-k loss at 0 throughout. `lr_decay_fraction`: the last fraction of
    the steps decays the lr linearly to 0 (SAELens's lr_decay_steps; with its constant scheduler
    sae-lens 6.54.12 decays from lr to 0, its lr_end applying to cosine annealing only).
    `normalize_activations`: SAELens's SAE input normalisation ('none' or
    'expected_average_only_in', whose factor SAELens folds into the weights after training).
    `l1_coefficient`: the L1 penalty of an architecture that has one (SAELens's standard SAE; None:
    SAELens's default); an architecture without one (TopK) ignores it."""
    steps = tokens // batch_tokens
    _, sae_cfg_cls = get_sae_training_class(architecture)
    sae_fields: dict[str, Any] = {
        "d_in": model.cfg.d_model,
        "d_sae": d_sae,
        "normalize_activations": normalize_activations,
    }
    if "topk" in architecture:
        # TopK and AbsTopK take an integer k, the batch variants a mean k per row
        sae_fields["k"] = int(k) if architecture in ("topk", "abstopk") else k
    if l1_coefficient is not None and "l1_coefficient" in {f.name for f in dataclasses.fields(sae_cfg_cls)}:
        sae_fields["l1_coefficient"] = l1_coefficient
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg_cls(**sae_fields),
        model_name=model.cfg.model_name,
        hook_name=hook,
        dataset_path=dataset_name,
        is_dataset_tokenized=False,
        streaming=False,
        context_size=context_size,
        training_tokens=tokens,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=16,
        # sae-lens 6.54.12's ActivationsStore sizes its mixing buffer as n_batches_in_buffer x
        # (context - left-out positions) activations, not x store_batch_size_prompts as its own
        # config's n_tokens_per_buffer (and 5.x's buffer) have it: so pass sequences
        n_batches_in_buffer=mixing_buffer_sequences(tokens, context_size, sink_positions, batch_tokens),
        lr=lr,
        lr_decay_steps=round(steps * lr_decay_fraction),
        device=str(model.cfg.device),
        seed=seed,
        dead_feature_window=dead_feature_window or max(1, steps // 20),
        # with normalize_activations, the mean norm is estimated on 50 batches (25,600 tokens at the
        # demo's 512-token batches) instead of SAELens's 1,000, which read 512k tokens (2.8x the
        # demo's MSE phase, ~8 min on Gemma-3-270m) before the first step
        n_batches_for_norm_estimate=NORM_ESTIMATE_BATCHES,
        prepend_bos=True,
        exclude_special_tokens=True,
        seqpos_slice=(sink_positions, None),
        checkpoint_path=None,
        output_path=None,
        n_checkpoints=0,
        verbose=False,
        logger=LoggingConfig(log_to_wandb=False),
        model_from_pretrained_kwargs={},
    )
