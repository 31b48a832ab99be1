"""A save_dir never loses what is in it: replacement keeps the folder's identity and works on a
mount point (trust issue II)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Crash, crash_at, make_sae, random_tokens, tiny_model
from sae_lens import SAE

from sae_lens_kl import kl_finetune
from sae_lens_kl.checkpoints import FINETUNE_STATE_FILENAME, sae_fingerprint
from sae_lens_kl.save_dir import MANIFEST_FILENAME, SaveDirInUseError
from sae_lens_kl.staging import staged_files


def _write_set(folder: Path, content: str) -> None:
    with staged_files(folder, last="cfg.json") as staging:
        for name in ("weights", "cfg.json"):
            (staging / name).write_text(content)


@pytest.mark.parametrize("mode", [0o700, 0o2775, 0o1777])
def test_replacing_an_artifact_keeps_the_folders_mode_owner_and_group(tmp_path, mode: int) -> None:
    folder = tmp_path / "sae"
    folder.mkdir()
    os.chmod(folder, mode)
    owner = (os.getuid(), os.getgid())
    if os.geteuid() == 0:  # as root the folder can belong to someone else, as a shared one does
        owner = (1234, 4321)
        os.chown(folder, *owner)
        os.chmod(folder, mode)  # chown cleared the setgid bit
    _write_set(folder, "old")
    _write_set(folder, "new")
    info = folder.stat()
    assert stat.S_IMODE(info.st_mode) == mode
    assert (info.st_uid, info.st_gid) == owner
    assert (folder / "weights").read_text() == "new"


@pytest.fixture
def mount_point(tmp_path) -> Iterator[Path]:
    """A tmpfs mounted at a folder (as a container volume is): its parent is another filesystem."""
    point = tmp_path / "volume"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_an_artifact_is_replaced_on_a_mount_point(mount_point: Path) -> None:
    assert os.stat(mount_point).st_dev != os.stat(mount_point.parent).st_dev
    (mount_point / "notes.txt").write_text("mine")
    _write_set(mount_point, "old")
    _write_set(mount_point, "new")
    assert [(mount_point / name).read_text() for name in ("weights", "cfg.json")] == ["new", "new"]
    assert sorted(p.name for p in mount_point.iterdir()) == ["cfg.json", "notes.txt", "weights"]
    assert not list(mount_point.parent.glob(".partial-*"))


# ---- overwrite through kl_finetune ------------------------------------------------------------

SEQ = 16
DATA = random_tokens(60, seq=SEQ)
STEP_TOKENS = 4 * SEQ
FAST = {"eval_tokens": 8 * SEQ, "batch_size": 4, "kl_chunk_tokens": 16, "lr": 2e-3, "tokens": 4 * STEP_TOKENS}
EVERY = {"checkpoint_every_tokens": STEP_TOKENS}


def finetune(sae: Any = None, **options: Any) -> Any:
    return kl_finetune(
        sae if sae is not None else make_sae("standard"), tiny_model(), DATA, **{**FAST, **options}
    )


def test_overwrite_keeps_the_old_sae_until_the_new_one_is_complete(tmp_path) -> None:
    out = tmp_path / "out"
    old = finetune(make_sae("standard", seed=1), save_dir=out, **EVERY)
    (out / "notes.txt").write_text("mine")
    new_sae = make_sae("standard", seed=2)
    with pytest.raises(Crash):
        finetune(new_sae, save_dir=out, overwrite=True, callbacks=[crash_at(2)], **EVERY)
    # The old run's SAE is still there, whole; its checkpoints are set aside, not resumable.
    assert torch.equal(SAE.load_from_disk(out).W_dec, old.W_dec)
    states = [json.loads(p.read_text()) for p in (out / "checkpoints").glob(f"*/{FINETUNE_STATE_FILENAME}")]
    assert states and all(s["fingerprints"]["sae"] == sae_fingerprint(new_sae) for s in states)
    assert len(list(out.glob(".superseded-*/checkpoints"))) == 1
    resumed = finetune(new_sae, save_dir=out, resume_from=out, **EVERY)
    assert torch.equal(resumed.W_dec, finetune(new_sae, **EVERY).W_dec)
    assert torch.equal(SAE.load_from_disk(out).W_dec, resumed.W_dec)
    assert not list(out.glob(".superseded-*"))  # gone once the new artifact was in place
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_what_the_earlier_run_wrote_and_this_one_does_not(tmp_path) -> None:
    out = tmp_path / "out"
    finetune(save_dir=out, adapter="linear", adapter_width=4)
    assert (out / "adapter.safetensors").is_file()
    finetune(save_dir=out, overwrite=True)
    assert not (out / "adapter.safetensors").exists()  # it belonged to the adapter run only
    written = json.loads((out / MANIFEST_FILENAME).read_text())["written"]
    assert "adapter.safetensors" not in written and "sae_weights.safetensors" in written


def test_overwrite_refuses_files_it_did_not_write(tmp_path) -> None:
    folder = tmp_path / "sae"
    sae = make_sae("standard", seed=1)
    sae.save_model(folder)  # a plain SAELens folder: the user's SAE
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    steps: list[int] = []
    with pytest.raises(
        FileExistsError, match="holds cfg.json, sae_weights.safetensors, which sae_lens_kl did"
    ):
        finetune(sae, save_dir=folder, overwrite=True, callbacks=[lambda t, o: steps.append(1)])  # noqa: ARG005
    assert steps == [] and {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_save_dir_equal_to_the_starting_sae_folder_is_refused(tmp_path) -> None:
    out = tmp_path / "out"
    finetune(save_dir=out)  # our own folder: overwrite may replace it, but not when it is the start
    start = SAE.load_from_disk(out)
    with pytest.raises(FileExistsError, match="is the folder the starting SAE is loaded from"):
        finetune(start, save_dir=out, overwrite=True, start_sae=out)
    assert torch.equal(SAE.load_from_disk(out).W_dec, start.W_dec)


def test_a_second_writer_gets_one_clear_error_naming_the_holder(tmp_path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            SaveDirInUseError, match=f"in use by another sae_lens_kl run \\(pid {holder.pid}\\)"
        ):
            finetune(save_dir=out, overwrite=True)
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    finetune(save_dir=out, overwrite=True)  # a dead holder's lock does not block
    assert (out / "cfg.json").is_file()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from sae_lens_kl.save_dir import exclusive
with exclusive(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from conftest import random_tokens, tiny_model
from sae_lens import SAE
from sae_lens_kl import kl_finetune, save_dir, staging

folder, point = Path(sys.argv[1]), sys.argv[2]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "before the exchange":
    staging._exchange = die
elif point == "after the exchange":
    save_dir.finish = die

def at_step_2(trainer, output):
    if point == "mid-run" and trainer.n_training_steps == 2:
        die()

kl_finetune(
    SAE.load_from_disk(folder), tiny_model(), random_tokens(60, seq=16), save_dir=folder,
    overwrite=True, callbacks=[at_step_2], checkpoint_every_tokens=64, eval_tokens=128,
    batch_size=4, kl_chunk_tokens=16, lr=2e-3, tokens=256,
)
"""


@pytest.mark.parametrize("point", ["mid-run", "before the exchange", "after the exchange"])
def test_kill_9_while_overwriting_the_sae_in_its_own_folder_leaves_a_loadable_sae(tmp_path, point) -> None:
    folder = tmp_path / "sae"
    old = finetune(make_sae("standard", seed=1), save_dir=folder)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(folder), point, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    loaded = SAE.load_from_disk(folder)
    new = finetune(old, save_dir=tmp_path / "uninterrupted", checkpoint_every_tokens=64)
    expected = new if point == "after the exchange" else old
    assert torch.equal(loaded.W_dec, expected.W_dec)
    # and the folder takes the next overwrite as usual
    finetune(loaded, save_dir=folder, overwrite=True)
    assert not list(folder.glob(".superseded-*")) and not list(tmp_path.glob(".partial-*"))


# ---- resume refuses every changed setting -----------------------------------------------------


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """The folder of a run killed at step 2 (checkpoints every step), for resumes to try."""
    out = tmp_path_factory.mktemp("killed") / "out"
    with pytest.raises(Crash):
        finetune(make_sae("standard", seed=1), save_dir=out, callbacks=[crash_at(2)], **EVERY)
    return out


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"sparsity_controller": "off"}, "sparsity_controller: checkpoint 'auto' vs now 'off'"),
        ({"controller_rate": 0.01}, "controller_rate: checkpoint 0.001 vs now 0.01"),
        ({"target_l0": 3.0}, "target_l0: checkpoint None vs now 3.0"),
        ({"sparsity_coefficient": 0.5}, "sparsity_coefficient: checkpoint None vs now 0.5"),
        ({"dead_feature_window": 7}, "dead_feature_window: checkpoint 1000 vs now 7"),
        ({"feature_sampling_window": 7}, "feature_sampling_window: checkpoint 2000 vs now 7"),
        ({"kl_chunk_tokens": 8}, "kl_chunk_tokens: checkpoint 16 vs now 8"),
        ({"eval_data": DATA[:8]}, "the held-out split"),
    ],
)
def test_resume_refuses_every_setting_that_changes_the_result(killed_run: Path, changed, named) -> None:
    with pytest.raises(ValueError, match=f"Cannot resume from .*{named}"):
        finetune(
            make_sae("standard", seed=1), save_dir=killed_run, resume_from=killed_run, **EVERY, **changed
        )


def test_resume_may_change_where_checkpoints_go_and_how_progress_is_logged(
    killed_run: Path, tmp_path
) -> None:
    sae = make_sae("standard", seed=1)
    resumed = finetune(
        sae,
        save_dir=tmp_path / "resumed",
        resume_from=killed_run,
        checkpoint_every_tokens=2 * STEP_TOKENS,
        keep_checkpoints=1,
        eval_batch_size=1,
        check_model_name=False,
    )
    assert torch.equal(resumed.W_dec, finetune(sae, **EVERY).W_dec)
