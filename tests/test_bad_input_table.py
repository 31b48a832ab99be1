"""The table of bad inputs (docs/bad_input.md): each row gets one clear error naming the problem and
the fix, before any training step and before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from conftest import make_sae, random_tokens, sentences, tiny_model, tiny_text_model

from sae_lens_kl import DataError, kl_finetune
from sae_lens_kl.checkpoints import FINETUNE_STATE_FILENAME, find_checkpoint

SEQ = 16
DATA = random_tokens(60, seq=SEQ)
FAST = {"eval_tokens": 8 * SEQ, "batch_size": 4, "kl_chunk_tokens": 16, "tokens": 4 * 4 * SEQ}


def topk_k_above_d_sae() -> Any:
    sae = make_sae("topk")
    sae.cfg.k = sae.cfg.d_sae + 1
    return sae


def two_saes() -> list[Any]:
    return [make_sae("topk"), make_sae("topk", hook_name="blocks.2.hook_resid_pre", seed=2)]


def out_of_vocabulary_dataset() -> datasets.Dataset:
    tokens = DATA.clone()
    tokens[0, 3] = 67  # tiny_model's vocabulary is 0..66
    return datasets.Dataset.from_dict({"input_ids": tokens.tolist()})


# (row, what is passed, the error, its message)
BAD_INPUT: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("warm-up < 0", {"lr_warm_up_steps": -1}, ValueError, "lr_warm_up_steps=-1 must be >= 0"),
    ("warm-up beyond the run", {"lr_warm_up_steps": 5}, ValueError, "exceeds the run's 4 steps"),
    ("feature_sampling_window 0", {"feature_sampling_window": 0}, ValueError, "must be at least 1"),
    ("dead_feature_window 0", {"dead_feature_window": 0}, ValueError, "must be at least 1"),
    (
        "float context_size",
        {"context_size": 16.0},
        ValueError,
        r"context_size=16.0 \(float\) must be an integer",
    ),
    (
        "float eval_tokens",
        {"eval_tokens": 128.0},
        ValueError,
        r"eval_tokens=128.0 \(float\) must be an integer",
    ),
    (
        "float exclude_first_positions",
        {"exclude_first_positions": 1.5},
        ValueError,
        "exclude_first_positions=1.5 .* must be an integer",
    ),
    ("bool batch_size", {"batch_size": True}, ValueError, r"batch_size=True \(bool\) must be an integer"),
    ("int prepend_bos", {"prepend_bos": 1}, ValueError, "prepend_bos=1 .* must be True or False or None"),
    (
        "string downstream_hooks",
        {"loss": "e2e+ds", "downstream_hooks": "blocks.2.hook_resid_post"},
        ValueError,
        "downstream_hooks=.* must be a list of strings",
    ),
    ("string lr", {"lr": "1e-3"}, ValueError, "lr='1e-3' .* must be a number"),
    ("data=5", {"data": 5}, DataError, r"data=int \(int\) is not a kind kl_finetune reads"),
    ("data a dict", {"data": {"text": ["a"]}}, DataError, r"\(dict\) is not a kind kl_finetune reads"),
    (
        "budget beyond a tensor",
        {"tokens": 1000 * 4 * SEQ},
        DataError,
        "packs into at most 68 sequences .* need 4008",
    ),
    (
        "ids out of range in a dataset",
        {"data": out_of_vocabulary_dataset()},
        DataError,
        r"Document 0 of the data holds token ids from \d+ to 67, outside \[0, 67\)",
    ),
    ("float16 SAE", {"sae": make_sae("topk").to(torch.float16)}, ValueError, "The SAE is float16"),
    ("TopK k > d_sae", {"sae": topk_k_above_d_sae()}, ValueError, r"k=97 must lie in \[1, d_sae=96\]"),
    ("two SAEs, LoRA on the LM", {"sae": two_saes(), "lm_lora_rank": 2}, ValueError, "Several SAEs per pass"),
    ("two SAEs, no prefix reuse", {"sae": two_saes(), "prefix_reuse": False}, ValueError, "Several SAEs per"),
]


@pytest.mark.parametrize(("row", "given", "error", "message"), BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input_gets_one_clear_error_before_any_work(tmp_path, row, given, error, message) -> None:  # noqa: ARG001
    given = dict(given)
    sae = given.pop("sae", None) or make_sae("topk")
    data = given.pop("data", DATA)
    steps: list[int] = []
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        kl_finetune(
            sae,
            tiny_model(),
            data,
            save_dir=out,
            callbacks=[lambda trainer, output: steps.append(1)],  # noqa: ARG005
            **{**FAST, **given},
        )
    assert steps == []
    assert not (out / "cfg.json").exists() and not (out / "checkpoints").exists()


def test_a_file_named_checkpoints_in_save_dir_is_refused_up_front(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    with pytest.raises(FileExistsError, match="holds a file named checkpoints"):
        kl_finetune(make_sae("topk"), tiny_model(), DATA, save_dir=out, overwrite=True, **FAST)
    assert (out / "checkpoints").read_text() == "not a folder"


def test_binary_files_in_text_data_are_named_in_a_warning(tmp_path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_bytes(bytes(range(128, 256)) * 8)  # not UTF-8
    (folder / "b.txt").write_text(" ".join(sentences(400)))
    with pytest.warns(UserWarning, match=r"a.txt is not UTF-8 text: 1024 of its 1024 characters"):
        kl_finetune(
            make_sae("topk"),
            tiny_text_model(),
            folder,
            tokens=4 * SEQ,
            eval_tokens=0,
            batch_size=4,
            check_model_name=False,
        )


def test_a_damaged_activation_scaler_falls_back_to_the_older_checkpoint(tmp_path) -> None:
    out = tmp_path / "out"
    sae = make_sae("topk")
    every = {**FAST, "checkpoint_every_tokens": 4 * SEQ, "lr": 2e-3}
    kl_finetune(sae, tiny_model(), DATA, save_dir=out, **every)
    newest = max(
        (state.parent for state in (out / "checkpoints").glob(f"*/{FINETUNE_STATE_FILENAME}")),
        key=lambda folder: json.loads((folder / FINETUNE_STATE_FILENAME).read_text())["training_tokens"],
    )
    scaler = newest / "activation_scaler.json"
    assert scaler.is_file()
    scaler.write_text('{"scaling_factor": ')  # a torn write
    with pytest.warns(UserWarning, match=f"Skipping checkpoint .*{newest.name}: JSONDecodeError"):
        found = find_checkpoint(out)
    assert found != newest and isinstance(found, Path)
