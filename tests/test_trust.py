"""No silent wrong result, no stale resume, nothing saved lost: the hostile-input table of the
trust issue, through the public API (the CLI's share is in test_cli_errors.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Crash, crash_at, make_sae, random_tokens, tiny_model

from sae_lens_kl import DataError, KLFinetuneTrainer, NonFiniteLossError, kl_finetune
from sae_lens_kl.save_dir import MANIFEST_FILENAME

SEQ = 16
DATA = random_tokens(60, seq=SEQ)
FAST = {"eval_tokens": 8 * SEQ, "batch_size": 4, "kl_chunk_tokens": 16, "lr": 2e-3}
STEP_TOKENS = 4 * SEQ


def finetune(sae=None, data=DATA, **options: Any):
    return kl_finetune(
        sae if sae is not None else make_sae("standard"),
        tiny_model(),
        data,
        **{"tokens": 4 * STEP_TOKENS, **FAST, **options},
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("kl_coefficient", float("nan")),
        ("controller_rate", float("nan")),
        ("target_l0", float("inf")),
        ("sparsity_coefficient", float("-inf")),
    ],
)
def test_non_finite_options_are_refused(option: str, value: float, tmp_path) -> None:
    with pytest.raises(ValueError, match=f"{option}=.* must be a finite number"):
        finetune(save_dir=tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()


def test_negative_coefficients_are_refused() -> None:
    with pytest.raises(ValueError, match="target_l0=-1.0 must be >= 0"):
        finetune(target_l0=-1.0)


def test_a_non_finite_sae_is_refused_before_any_work(tmp_path) -> None:
    sae = make_sae("standard")
    with torch.no_grad():
        sae.W_enc[:, 5] = float("nan")  # a latent that may never fire
    with pytest.raises(ValueError, match="W_enc holds 32 non-finite values"):
        finetune(sae, eval_tokens=0, save_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_are_checked_before_saving(tmp_path) -> None:
    # A NaN that no loss sees (a latent that never fires and an unused bias) must not be saved.
    def poison_after_last_step(trainer: KLFinetuneTrainer, output: Any) -> None:  # noqa: ARG001
        if trainer.n_training_samples == trainer.cfg.total_training_samples:
            with torch.no_grad():
                trainer.sae.W_dec[7] = float("nan")

    with pytest.raises(NonFiniteLossError, match="W_dec holds non-finite values.*not saved"):
        finetune(eval_tokens=0, save_dir=tmp_path / "out", callbacks=[poison_after_last_step])
    assert not (tmp_path / "out" / "sae_weights.safetensors").exists()


def test_token_ids_outside_the_vocabulary_are_refused_up_front() -> None:
    too_large = DATA.clone()
    too_large[3, 4] = 67  # tiny_model's vocabulary is 0..66
    negative = DATA.clone()
    negative[0, 0] = -1
    for bad in (too_large, negative):
        with pytest.raises(DataError, match=r"Token ids must lie in \[0, 67\)"):
            finetune(data=bad)
    with pytest.raises(DataError, match="integer ids"):
        finetune(data=DATA.float())


def test_the_callers_random_state_is_left_alone() -> None:
    model, sae = tiny_model(), make_sae("standard")  # (these seed torch themselves)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    kl_finetune(sae, model, DATA, tokens=4 * STEP_TOKENS, **FAST)
    assert torch.equal(torch.get_rng_state(), state)


def test_save_dir_under_a_file_fails_before_any_work(tmp_path) -> None:
    (tmp_path / "file").write_text("not a folder")
    steps: list[int] = []
    with pytest.raises(FileExistsError, match="is a file"):
        finetune(save_dir=tmp_path / "file" / "out", callbacks=[lambda t, o: steps.append(1)])  # noqa: ARG005
    assert steps == []


def test_resume_refuses_another_sae_or_other_data(tmp_path) -> None:
    out = tmp_path / "out"
    sae = make_sae("standard", seed=1)
    with pytest.raises(Crash):
        finetune(sae, save_dir=out, checkpoint_every_tokens=STEP_TOKENS, callbacks=[crash_at(2)])
    with pytest.raises(ValueError, match="differs in the starting sae"):
        finetune(make_sae("standard", seed=2), save_dir=out, resume_from=out)
    other = DATA.flip(0)
    with pytest.raises(ValueError, match="differs in the starting data"):
        finetune(sae, data=other, save_dir=out, resume_from=out)


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path) -> None:
    out = tmp_path / "out"
    sae = make_sae("standard", seed=1)
    every = {"checkpoint_every_tokens": STEP_TOKENS}
    with pytest.raises(Crash):
        finetune(sae, save_dir=out, callbacks=[crash_at(3)], **every)
    newest = out / "checkpoints" / str(3 * STEP_TOKENS)
    (newest / "sae_weights.safetensors").write_bytes(b"\x00" * 40)  # a torn write
    with pytest.warns(UserWarning, match=f"Skipping checkpoint .*{newest.name}"):
        resumed = finetune(sae, save_dir=out, resume_from=out, **every)
    assert torch.equal(resumed.W_dec, finetune(sae, **every).W_dec)


def test_leftovers_of_a_killed_run_are_cleaned_and_old_checkpoints_pruned(tmp_path) -> None:
    out = tmp_path / "out"
    (out / "checkpoints" / ".partial-192-dead").mkdir(parents=True)
    (out / MANIFEST_FILENAME).write_text(json.dumps({"written": ["checkpoints"]}))  # as a run records
    (out / ".partial-files-dead").mkdir()
    (tmp_path / ".partial-out-0123abcd").mkdir()  # the old copy a killed artifact swap leaves
    (tmp_path / ".partial-out-2-0123abcd").mkdir()  # another folder's (out-2): not ours to delete
    finetune(
        save_dir=out,
        overwrite=True,
        tokens=6 * STEP_TOKENS,
        checkpoint_every_tokens=STEP_TOKENS,
        keep_checkpoints=2,
    )
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [str(4 * STEP_TOKENS), str(5 * STEP_TOKENS), f"final_{6 * STEP_TOKENS}"]
    assert not list(out.glob(".partial-*"))
    assert [p.name for p in tmp_path.glob(".partial-*")] == [".partial-out-2-0123abcd"]
    umask = os.umask(0)
    os.umask(umask)
    for folder in (out / "checkpoints", *(out / "checkpoints").iterdir()):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder


def test_the_non_finite_loss_error_names_the_resumed_checkpoint(tmp_path) -> None:
    out = tmp_path / "out"
    sae = make_sae("standard", seed=1)
    every = {"checkpoint_every_tokens": 2 * STEP_TOKENS, "tokens": 8 * STEP_TOKENS}
    with pytest.raises(Crash):
        finetune(sae, save_dir=out, callbacks=[crash_at(3)], **every)

    def poison(trainer: KLFinetuneTrainer, output: Any) -> None:  # noqa: ARG001
        with torch.no_grad():
            trainer.sae.b_dec.fill_(float("nan"))

    checkpoint = Path("checkpoints") / str(2 * STEP_TOKENS)
    with pytest.raises(NonFiniteLossError, match=f"Last good checkpoint: .*{checkpoint}"):
        finetune(sae, save_dir=out, resume_from=out, callbacks=[poison], **every)


def test_an_artifact_appears_in_one_exchange_of_folders(tmp_path) -> None:
    from sae_lens_kl.staging import staged_files

    folder = tmp_path / "sae"
    (folder / "checkpoints" / "64").mkdir(parents=True)
    (folder / "checkpoints" / "64" / "weights").write_text("a checkpoint")
    for name in ("weights", "cfg.json"):
        (folder / name).write_text("old")
    (folder / "notes.txt").write_text("mine")
    before = {path: path.stat().st_ino for path in (folder, folder / "notes.txt")}
    with staged_files(folder, last="cfg.json") as staging:
        for name in ("weights", "cfg.json"):
            (staging / name).write_text("new")
        assert (folder / "weights").read_text() == "old"  # nothing changes before the block ends
    # Another folder now stands at the path (one rename), holding the new set and, as the same
    # files (hard links), everything else the old one held.
    assert folder.stat().st_ino != before[folder]
    assert [(folder / name).read_text() for name in ("weights", "cfg.json")] == ["new", "new"]
    assert (folder / "notes.txt").stat().st_ino == before[folder / "notes.txt"]
    assert (folder / "checkpoints" / "64" / "weights").read_text() == "a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "checkpoints", "notes.txt", "weights"]


def test_without_an_exchange_a_set_of_files_never_mixes_old_and_new(tmp_path, monkeypatch) -> None:
    from sae_lens_kl import staging as staging_module

    # as on a platform or filesystem without renameat2(RENAME_EXCHANGE)
    monkeypatch.setattr(staging_module, "_exchange", lambda a, b: False)  # noqa: ARG005
    folder = tmp_path / "sae"
    folder.mkdir()
    for name in ("weights", "cfg.json"):
        (folder / name).write_text("old")
    (folder / "z_blocked").mkdir()
    (folder / "z_blocked" / "child").write_text("a non-empty folder cannot be renamed over")
    with pytest.raises(OSError), staging_module.staged_files(folder, last="cfg.json") as staging:
        for name in ("weights", "cfg.json"):
            (staging / name).write_text("new")
        (staging / "z_blocked").mkdir()  # renamed after "weights" (by name), and that fails
    # New weights arrived, but the old marker went first and the new one never came: the set is
    # unusable rather than old cfg.json beside new weights.
    assert (folder / "weights").read_text() == "new"
    assert not (folder / "cfg.json").exists()
    assert not list(folder.glob(".partial-*")) and sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_an_sae_naming_no_model_is_a_loud_warning() -> None:
    sae = make_sae("standard")
    sae.cfg.metadata.model_name = None
    with pytest.warns(UserWarning, match="names no model, so sae_lens_kl cannot check"):
        finetune(sae, tokens=STEP_TOKENS)


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_its_checks(tmp_path) -> None:
    out = tmp_path / "out"
    finetune(save_dir=out)
    weights = (out / "sae_weights.safetensors").read_bytes()
    with pytest.raises(DataError, match="packs into at most 5 sequences"):
        finetune(data=DATA[:5], save_dir=out, overwrite=True)
    assert (out / "sae_weights.safetensors").read_bytes() == weights
