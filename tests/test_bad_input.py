"""Bad input: one clear error, before work starts where possible; nothing saved is lost."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model

from sae_lens_kl import (
    DataError,
    KLFinetuneTrainer,
    NonFiniteLossError,
    UnsupportedSAEError,
    kl_finetune,
)

SEQ = 16
DATA = random_tokens(60, seq=SEQ)
FAST = {"eval_tokens": 8 * SEQ, "batch_size": 4, "kl_chunk_tokens": 16}


def finetune(sae=None, data=DATA, **options: Any):
    return kl_finetune(
        sae if sae is not None else make_sae("topk"),
        tiny_model(),
        data,
        **{"tokens": 4 * 4 * SEQ, **FAST, **options},
    )


def test_hook_not_in_model() -> None:
    with pytest.raises(ValueError, match=r"'blocks.7.hook_resid_pre' does not exist"):
        finetune(make_sae("topk", hook_name="blocks.7.hook_resid_pre"))


def test_width_mismatch() -> None:
    with pytest.raises(
        ValueError, match="reads 16-dimensional activations but blocks.1.hook_resid_pre is 32"
    ):
        finetune(make_sae("topk", d_in=16))


def test_sae_of_another_model() -> None:
    sae = make_sae("topk")
    sae.cfg.metadata.model_name = "gpt2-small"
    with pytest.raises(ValueError, match="trained on 'gpt2-small' but the model is 'tiny-test-model'"):
        finetune(sae)
    finetune(sae, check_model_name=False, tokens=4 * SEQ)


def test_context_longer_than_the_model() -> None:
    with pytest.raises(ValueError, match="exceeds the model's n_ctx=64"):
        finetune(context_size=65)


def test_budget_smaller_than_a_batch() -> None:
    with pytest.raises(ValueError, match="less than one batch"):
        finetune(tokens=4 * SEQ - 1)


def test_unsupported_architecture() -> None:
    with pytest.raises(UnsupportedSAEError, match="'matching_pursuit'"):
        finetune(make_sae("matching_pursuit"))


def test_bad_option_and_bad_values() -> None:
    with pytest.raises(TypeError, match="unknown options \\['learning_rate'\\]"):
        finetune(learning_rate=1e-3)
    with pytest.raises(ValueError, match="loss='kl-only'"):
        finetune(loss="kl-only")


def test_empty_and_short_data() -> None:
    # a token tensor's length is known up front: too short for the budget is refused before work
    with pytest.raises(DataError, match=r"packs into at most 0 sequences .* need 24"):
        finetune(data=DATA[:0])
    with pytest.raises(DataError, match=r"packs into at most 11 sequences of 16 tokens"):
        finetune(data=DATA[:10])
    with pytest.raises(DataError, match="packs into at most 22 sequences"):
        finetune(data=DATA[:20], tokens=10 * 4 * SEQ)
    # a stream's length is not: running out is found as it happens
    with pytest.raises(DataError, match=r"The evaluation data \(token tensor \(0, 16\)\) holds fewer than 8"):
        finetune(eval_data=DATA[:0])
    sae = make_sae("topk")
    with pytest.raises(ValueError, match="no dataset_path"):
        kl_finetune(sae, tiny_model(), tokens=4 * SEQ)


def test_existing_save_dir_is_refused_and_left_alone(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "cfg.json").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        finetune(save_dir=out)
    assert (out / "cfg.json").read_text() == "precious"
    # not ours (no manifest names it): overwrite does not replace it either
    with pytest.raises(FileExistsError, match="holds cfg.json, which sae_lens_kl did not write"):
        finetune(save_dir=out, overwrite=True)
    assert (out / "cfg.json").read_text() == "precious"
    assert not [p for p in out.iterdir() if p.name.startswith(".partial")]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    def poison(trainer: KLFinetuneTrainer, output: Any) -> None:  # noqa: ARG001
        if trainer.n_training_steps == 3:
            with torch.no_grad():
                trainer.sae.b_dec.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*Last good checkpoint: .*checkpoints/128"):
        finetune(
            save_dir=tmp_path / "run",
            checkpoint_every_tokens=2 * 4 * SEQ,
            tokens=6 * 4 * SEQ,
            callbacks=[poison],
        )
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["128"]
    assert not (tmp_path / "run" / "cfg.json").exists()


def test_excluding_every_position() -> None:
    with pytest.raises(ValueError, match="exclude_first_positions=16 leaves no position"):
        finetune(exclude_first_positions=16)


def test_controller_on_an_sae_without_a_sparsity_coefficient() -> None:
    with pytest.raises(ValueError, match="'topk' has no sparsity coefficient"):
        finetune(sparsity_controller="on")


def test_device_other_than_the_models() -> None:
    with pytest.raises(ValueError, match="device='meta' but the model is on cpu"):
        finetune(device="meta")


def test_model_split_over_devices_is_refused() -> None:
    # TransformerLens builds an n_devices model only with CUDA; the setting is what is checked
    model = tiny_model()
    model.cfg.n_devices = 2
    with pytest.raises(ValueError, match="split over n_devices=2 devices"):
        kl_finetune(make_sae("topk"), model, DATA, tokens=4 * 4 * SEQ, **FAST)


def test_checkpointed_suffix_with_lm_lora_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="checkpoint_suffix=True with lm_lora_rank"):
        finetune(checkpoint_suffix=True, lm_lora_rank=2, loss="kl", save_dir=tmp_path)
    assert not any(tmp_path.iterdir())
