"""train_with_kl_phase's two ways into the KL phase: a fresh Adam with its own decaying lr (the
default, the paper's recipe for a pretrained SAE) or the MSE phase's Adam continued at one constant
lr (the paper's A.1 runs)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens.constants import TRAINER_STATE_FILENAME

from sae_lens_kl import kl_finetune
from sae_lens_kl.train import (
    kl_phase_sequences,
    mse_phase,
    mse_phase_sequences,
    runner_config,
    train_with_kl_phase,
)

SEQ, BATCH_TOKENS, MSE_STEPS, KL_STEPS, KL_BATCH = 16, 64, 12, 3, 4
KL_TOKENS = KL_STEPS * KL_BATCH * SEQ
DATA = random_tokens(160, seq=SEQ)


def _runner_cfg(
    model,
    lr_decay_fraction: float = 0.0,
    *,
    tokens: int = MSE_STEPS * BATCH_TOKENS + KL_TOKENS,
    sinks: int = 0,
    dataset_name: str = "tokens",
    normalize: str = "none",
):
    return runner_config(
        model,
        "blocks.1.hook_resid_pre",
        architecture="topk",
        d_sae=64,
        k=4,
        tokens=tokens,
        context_size=SEQ,
        lr=1e-3,
        batch_tokens=BATCH_TOKENS,
        sink_positions=sinks,
        dataset_name=dataset_name,
        lr_decay_fraction=lr_decay_fraction,
        normalize_activations=normalize,
    )


def _adam_steps(save_dir: Path) -> set[float]:
    (state_file,) = (save_dir / "checkpoints").rglob(TRAINER_STATE_FILENAME)
    state = torch.load(state_file, weights_only=True)["optimizer"]["state"]
    return {float(parameter["step"]) for parameter in state.values()}


def test_the_a1_recipe_continues_the_mse_phase_adam(tmp_path) -> None:
    model = tiny_model()
    cfg = _runner_cfg(model)
    options = {"kl_fraction": KL_TOKENS / cfg.training_tokens, "batch_size": KL_BATCH, "eval_tokens": 0}
    continued = train_with_kl_phase(
        cfg, model, DATA, continue_optimizer=True, save_dir=tmp_path / "a1", **options
    )
    report = continued.sae.cfg.metadata.kl_finetune
    # one constant lr for both phases: the MSE phase's
    assert (report["config"]["lr"], report["config"]["lr_schedule"]) == (cfg.lr, "constant")
    assert report["steps"] == KL_STEPS and continued.mse_tokens == MSE_STEPS * BATCH_TOKENS
    # Adam's step count runs on from the MSE phase's (its bias correction too); a fresh Adam's does not
    assert _adam_steps(tmp_path / "a1") == {MSE_STEPS + KL_STEPS}
    fresh = train_with_kl_phase(cfg, model, DATA, save_dir=tmp_path / "fresh", lr=cfg.lr, **options)
    assert _adam_steps(tmp_path / "fresh") == {KL_STEPS}
    # the same MSE phase (seeded) and the same KL tokens: only the optimizer differs
    assert torch.equal(continued.mse_sae.W_dec, fresh.mse_sae.W_dec)
    assert not torch.equal(continued.sae.W_dec, fresh.sae.W_dec)


def test_the_a1_recipe_refuses_what_it_cannot_continue(tmp_path) -> None:
    model = tiny_model()
    cfg = _runner_cfg(model)
    fraction = KL_TOKENS / cfg.training_tokens
    with pytest.raises(ValueError, match="mse_sae was given"):
        train_with_kl_phase(
            cfg, model, DATA, kl_fraction=fraction, continue_optimizer=True, mse_sae=make_sae("topk")
        )
    with pytest.raises(ValueError, match="decays over"):
        train_with_kl_phase(
            _runner_cfg(model, 0.2), model, DATA, kl_fraction=fraction, continue_optimizer=True
        )
    with pytest.raises(ValueError, match="needs an MSE phase"):
        train_with_kl_phase(cfg, model, DATA, kl_fraction=1.0, continue_optimizer=True)
    # SAELens folds the normalisation factor into the weights after the MSE phase: its Adam moments
    # would then belong to other weights
    normalised = dataclasses.replace(
        cfg, sae=dataclasses.replace(cfg.sae, normalize_activations="expected_average_only_in")
    )
    with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in'"):
        train_with_kl_phase(normalised, model, DATA, kl_fraction=fraction, continue_optimizer=True)
    # kl_finetune's own option: a folder without SAELens's trainer state, or another SAE's state
    sae = make_sae("topk")
    with pytest.raises(ValueError, match=f"holds no {TRAINER_STATE_FILENAME}"):
        kl_finetune(
            sae, model, DATA, tokens=KL_TOKENS, batch_size=KL_BATCH, continue_optimizer_from=str(tmp_path)
        )
    train_with_kl_phase(
        cfg, model, DATA, kl_fraction=fraction, save_dir=tmp_path / "run", batch_size=KL_BATCH, eval_tokens=0
    )
    (state_file,) = (tmp_path / "run" / "checkpoints").rglob(TRAINER_STATE_FILENAME)
    wider = make_sae("topk", d_sae=32)
    with pytest.raises(ValueError, match="Adam state is for parameters of shapes"):
        kl_finetune(
            wider,
            model,
            DATA,
            tokens=KL_TOKENS,
            batch_size=KL_BATCH,
            continue_optimizer_from=str(state_file.parent),
        )
    with pytest.raises(ValueError, match="continue_optimizer_from with adapter"):
        kl_finetune(
            sae, model, DATA, tokens=KL_TOKENS, adapter="linear", continue_optimizer_from=str(tmp_path)
        )


def test_the_mse_phase_can_start_its_decoder_bias_at_the_activations_mean() -> None:
    model = tiny_model()
    # one step at an lr that cannot move it: b_dec is where it started
    cfg = dataclasses.replace(_runner_cfg(model), lr=1e-12)
    sae = mse_phase(cfg, model, DATA, BATCH_TOKENS, b_dec_init="mean")
    _, cache = model.run_with_cache(DATA, names_filter="blocks.1.hook_resid_pre")
    acts = cache["blocks.1.hook_resid_pre"].flatten(0, 1).double()
    # the mean of one shuffled batch of BATCH_TOKENS rows: within 6 standard errors of the data's
    tolerance = 6 * acts.std(0) / BATCH_TOKENS**0.5
    assert sae.b_dec.detach().abs().max() > 0
    assert ((sae.b_dec.detach().double() - acts.mean(0)).abs() <= tolerance).all()
    with pytest.raises(ValueError, match="needs normalize_activations='none'"):
        normalised = dataclasses.replace(
            cfg, sae=dataclasses.replace(cfg.sae, normalize_activations="expected_average_only_in")
        )
        mse_phase(normalised, model, DATA, BATCH_TOKENS, b_dec_init="mean")


def _count_sequences_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that SAELens's ActivationsStore.get_batch_tokens (the real one, called through)
    appends each batch's sequence count to."""
    from sae_lens.training.activations_store import ActivationsStore

    counts: list[int] = []
    read = ActivationsStore.get_batch_tokens

    def counted(self: ActivationsStore, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens = read(self, *args, **kwargs)
        counts.append(len(tokens))
        return tokens

    monkeypatch.setattr(ActivationsStore, "get_batch_tokens", counted)
    return counts


@pytest.mark.parametrize(
    ("tokens", "b_dec_init", "normalize", "sinks"),
    [
        (MSE_STEPS * BATCH_TOKENS, "zeros", "none", 0),
        (MSE_STEPS * BATCH_TOKENS, "mean", "none", 0),
        (MSE_STEPS * BATCH_TOKENS, "zeros", "expected_average_only_in", 0),
        (MSE_STEPS * BATCH_TOKENS + BATCH_TOKENS // 2, "zeros", "none", 2),
    ],
)
def test_mse_phase_sequences_is_what_saelens_reads(
    tokens: int, b_dec_init: str, normalize: str, sinks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model()

    def config(normalize: str) -> Any:
        cfg = _runner_cfg(model, tokens=tokens, sinks=sinks, normalize=normalize)
        return dataclasses.replace(cfg, n_batches_for_norm_estimate=7, store_batch_size_prompts=3)

    cfg = config(normalize)
    counts = _count_sequences_read(monkeypatch)
    mse_phase(cfg, model, DATA, tokens, b_dec_init=b_dec_init)
    expected = mse_phase_sequences(cfg, model, DATA, tokens, b_dec_init)
    # the mixing buffer reads ahead of the steps' sequences: the count must follow it exactly
    assert expected == sum(counts) > tokens // (SEQ - sinks)
    # each case's sizes tell apart the batches it adds: leaving one out would count otherwise
    if b_dec_init == "mean":  # the batch b_dec's mean is taken from
        assert mse_phase_sequences(cfg, model, DATA, tokens, "zeros") != expected
    if normalize != "none":  # the norm estimate's batches
        assert mse_phase_sequences(config("none"), model, DATA, tokens, b_dec_init) != expected
    if tokens % BATCH_TOKENS:  # a last, partial batch is a step too
        floor = tokens // BATCH_TOKENS * BATCH_TOKENS
        assert mse_phase_sequences(cfg, model, DATA, floor, b_dec_init) != expected


def test_the_kl_phase_starts_after_every_sequence_the_mse_phase_read(
    tiny_lm_folder: Path, text_folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sae_lens_kl.data import token_sequences
    from sae_lens_kl.models import load_model

    model = load_model(str(tiny_lm_folder))
    train_text = text_folders[0]
    cfg = _runner_cfg(model, tokens=MSE_STEPS * BATCH_TOKENS, dataset_name=str(train_text))
    counts = _count_sequences_read(monkeypatch)
    mse_phase(cfg, model, train_text, cfg.training_tokens, b_dec_init="mean")
    read = sum(counts)
    sequences = torch.stack(list(itertools.islice(token_sequences(train_text, model, SEQ, True), read + 8)))
    # documents joined by BOS, which SAELens leaves out of the buffer: the count follows that too
    assert (sequences[:read, 1:] == model.tokenizer.bos_token_id).any()
    assert mse_phase_sequences(cfg, model, train_text, cfg.training_tokens, "mean") == read
    kl, _ = kl_phase_sequences(cfg, model, train_text, cfg.training_tokens, 4 * SEQ, "mean")
    assert torch.equal(kl, sequences[read : read + 4])
    second, _ = kl_phase_sequences(
        cfg, model, train_text, cfg.training_tokens, 4 * SEQ, "mean", skip_tokens=4 * SEQ
    )
    assert torch.equal(second, sequences[read + 4 : read + 8])


def test_mse_phase_sequences_refuses_store_settings_it_does_not_replay() -> None:
    model = tiny_model()
    cfg = dataclasses.replace(_runner_cfg(model), disable_concat_sequences=True)
    with pytest.raises(ValueError, match="disable_concat_sequences"):
        mse_phase_sequences(cfg, model, DATA, MSE_STEPS * BATCH_TOKENS)
