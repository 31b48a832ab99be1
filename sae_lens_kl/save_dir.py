"""What a fine-tune owns in its save_dir, and how it replaces an earlier run there without ever
losing it.

- A manifest (`.sae_lens_kl.json`) names every entry this package wrote into the folder; an
  overwrite replaces or removes only those. A folder holding files of the names we write that no
  manifest claims (an SAE saved by SAELens, another tool's report) is refused before any work.
- With overwrite, nothing of the earlier run is removed before the new artifact is complete: its
  SAE stays loadable in place until the new one replaces it in one exchange (staging.py), and its
  checkpoints are moved aside (`.superseded-*`, so that they cannot be resumed into the new run)
  and deleted only after that exchange.
- One writer per folder: an advisory lock (flock on `.sae_lens_kl.lock`) held for the whole run;
  the kernel releases it when the holder dies, so a kill -9 leaves no stale lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME

from sae_lens_kl.adapters import ADAPTER_FILENAME
from sae_lens_kl.checkpoints import CHECKPOINTS_DIRNAME
from sae_lens_kl.lm_lora import LM_LORA_FILENAME
from sae_lens_kl.staging import PARTIAL_PREFIX, remove_partial_folders, write_file

MANIFEST_FILENAME = ".sae_lens_kl.json"
LOCK_FILENAME = ".sae_lens_kl.lock"
SUPERSEDED_PREFIX = ".superseded-"
CONFIG_FILENAME = "kl_finetune_config.json"
METRICS_FILENAME = "kl_finetune_metrics.json"
REPORT_FILES = ("report.json", "report.md", "training_curves.png", "before_after.png")
# Every name a fine-tune (with the command's report) may write into its save_dir.
WRITTEN_FILES = (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    CONFIG_FILENAME,
    METRICS_FILENAME,
    ADAPTER_FILENAME,
    LM_LORA_FILENAME,
    *REPORT_FILES,
    CHECKPOINTS_DIRNAME,
)
# Our bookkeeping, which says nothing about whether the folder holds a run.
_BOOKKEEPING = (MANIFEST_FILENAME, LOCK_FILENAME)


class SaveDirInUseError(OSError):
    """Another process is writing into the save_dir."""


def member_names(count: int) -> list[str]:
    """The names of a run's SAEs: "sae_<i>", their keys in shared clean runs and (for several)
    their folders."""
    return [f"sae_{index}" for index in range(count)]


def member_folders(folder: Path | None, count: int) -> list[Path | None]:
    """Where each of a run's `count` SAEs is saved: one SAE in `folder` itself, SAE i of several in
    folder/sae_<i>."""
    if folder is None:
        return [None] * count
    return [folder] if count == 1 else [folder / name for name in member_names(count)]


def written_here(folder: Path) -> set[str]:
    """The entries of `folder` this package wrote: those its manifest names; in a folder written
    before manifests existed (it holds kl_finetune_metrics.json), every entry of a name we write."""
    manifest = folder / MANIFEST_FILENAME
    if manifest.is_file():
        try:
            return set(json.loads(manifest.read_text())["written"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{manifest} is damaged ({error}); it says which files sae_lens_kl wrote there. "
                "Pass another save_dir, or move the folder's files elsewhere."
            ) from error
    if (folder / METRICS_FILENAME).is_file():
        return {name for name in WRITTEN_FILES if (folder / name).exists()}
    return set()


def holds_nothing(folder: Path) -> bool:
    """True when `folder` does not exist or holds nothing but this package's bookkeeping and the
    staging leftovers of a killed run."""
    if not folder.is_dir():
        return not folder.exists()
    return all(
        entry.name in _BOOKKEEPING or entry.name.startswith(PARTIAL_PREFIX) for entry in folder.iterdir()
    )


def check_can_overwrite(folder: Path) -> None:
    """Refuse, before any work, a folder where an overwrite would replace files this package did
    not write (an SAE saved by SAELens, another tool's cfg.json or report)."""
    if not folder.is_dir():
        return
    ours = written_here(folder)
    foreign = sorted(name for name in WRITTEN_FILES if (folder / name).exists() and name not in ours)
    if foreign:
        raise FileExistsError(
            f"save_dir {folder} holds {', '.join(foreign)}, which sae_lens_kl did not write (its "
            f"{MANIFEST_FILENAME} does not name them): overwrite replaces only what sae_lens_kl wrote. "
            "Pass another save_dir, or move those files elsewhere first."
        )


def start_sources(start_sae: Any, count: int) -> list[str | None]:
    """One source per SAE: a local folder made absolute, RELEASE:SAE_ID as given."""
    given = (
        [start_sae] * count
        if start_sae is None or isinstance(start_sae, (str, os.PathLike))
        else list(start_sae)
    )
    if len(given) != count or (count > 1 and isinstance(start_sae, (str, os.PathLike))):
        raise ValueError(f"start_sae: pass one source per SAE ({count}), got {start_sae!r}.")
    sources: list[str | None] = []
    for source in given:
        if source is None:
            sources.append(None)
            continue
        path = Path(source).expanduser()
        sources.append(str(path.resolve()) if path.is_dir() else str(source))
    return sources


def check_not_the_start(folder: Path, start_source: str | None) -> None:
    """Refuse a save_dir that is the folder the starting SAE is loaded from: the result would
    replace the only copy of the starting SAE, and `start_sae` would name the tuned one."""
    if start_source is None or not folder.is_dir():
        return
    start = Path(start_source).expanduser()
    if start.is_dir() and start.resolve() == folder.resolve():
        raise FileExistsError(
            f"save_dir {folder} is the folder the starting SAE is loaded from; the fine-tuned SAE "
            "would replace it. Pass another save_dir (copy the folder first if the result should "
            "live beside it)."
        )


def prepare(folder: Path, *, overwrite: bool, resuming: bool) -> None:
    """Create `folder`, delete the staging folders a killed run left, and with overwrite (not
    resuming) move the earlier run's checkpoints aside: a resume then finds only this run's, and
    they are deleted once this run's artifact is in place (`finish`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftovers in (folder, folder / CHECKPOINTS_DIRNAME):
        remove_partial_folders(leftovers)
    # the old copy an artifact swap (staging.staged_files) left beside the folder if killed
    remove_partial_folders(folder.resolve().parent, folder.resolve().name)
    checkpoints = folder / CHECKPOINTS_DIRNAME
    if overwrite and not resuming and checkpoints.is_dir() and CHECKPOINTS_DIRNAME in written_here(folder):
        aside = folder / f"{SUPERSEDED_PREFIX}{secrets.token_hex(4)}"
        aside.mkdir()
        os.replace(checkpoints, aside / CHECKPOINTS_DIRNAME)
    record_written(folder, [CHECKPOINTS_DIRNAME])  # this run's checkpoints will go there


def stale_entries(folder: Path, writing: Collection[str]) -> set[str]:
    """The entries an earlier run wrote that this one does not rewrite (an adapter of an adapter
    run, an older report): removed in the same exchange that brings the new artifact."""
    return {name for name in written_here(folder) - set(writing) if (folder / name).exists()}


def manifest_text(folder: Path, writing: Collection[str], removing: Collection[str]) -> str:
    """The manifest after an exchange that writes `writing` and removes `removing`."""
    written = (written_here(folder) - set(removing)) | set(writing)
    return json.dumps({"written": sorted(written - {MANIFEST_FILENAME})}, indent=2)


def record_written(folder: Path, names: Collection[str]) -> None:
    """Add `names` to the manifest of `folder` (files written one at a time, e.g. a report)."""
    write_file(folder / MANIFEST_FILENAME, manifest_text(folder, names, ()))


def finish(folder: Path) -> None:
    """Delete the earlier runs' checkpoints set aside by `prepare`, now that the new artifact is
    in place."""
    for aside in folder.glob(f"{SUPERSEDED_PREFIX}*"):
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold the folder's writer lock for the block; a second run (another process) gets one
    clear error naming the holder. Re-entrant within one process (a command that locks its
    output folder and then calls kl_finetune into it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILENAME
    handle = open(path, "a+")  # noqa: SIM115 (held open for the whole block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = _holder(path)
            if holder == os.getpid():
                yield  # this process holds it already
                return
            raise SaveDirInUseError(
                f"save_dir {folder} is in use by another sae_lens_kl run (pid {holder or 'unknown'}); "
                "wait for it to finish, or pass another save_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
