"""Writing so that a reader never sees half of anything: everything is built under a temporary
name beside its target and renamed into place. Every file and folder this package writes goes
through these helpers."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_PREFIX = ".partial-"


def _staging_folder(parent: Path, name: str) -> Path:
    """A new empty folder `parent/.partial-<name>-<random>`, with the permissions any new folder
    gets (mkdir honours the umask; tempfile.mkdtemp would make it private to the user)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = parent / f"{PARTIAL_PREFIX}{name}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


def remove_partial_folders(folder: Path) -> list[Path]:
    """Delete the staging folders a killed run left directly inside `folder`; returns them."""
    leftovers = sorted(folder.glob(f"{PARTIAL_PREFIX}*")) if folder.is_dir() else []
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    return leftovers


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `target`; when the block succeeds it replaces
    `target` (an older `target` is removed only then). On failure nothing at `target` changes."""
    staging = _staging_folder(target.parent, target.name)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_files(folder: Path, last: str | None = None) -> Iterator[Path]:
    """Yields an empty temporary folder inside `folder`; when the block succeeds each file written
    there is renamed into `folder` (replacing a file of that name). `last` is the marker a reader
    needs to use the set (an SAE's cfg.json, a cache's cache.json): the old one is deleted before
    any file is replaced and the new one renamed in after all of them, so a reader sees the old
    set, no marker, or the new set, never a mix, even if the process dies in between. If the
    block fails nothing in `folder` changes."""
    staging = _staging_folder(folder, "files")
    try:
        yield staging
        if last is not None:
            (folder / last).unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda path: (path.name == last, path.name)):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file(path: Path, data: str | bytes) -> None:
    """Write one file so that it appears whole or not at all."""
    with staged_files(path.parent) as staging:
        staged = staging / path.name
        staged.write_bytes(data.encode() if isinstance(data, str) else data)
