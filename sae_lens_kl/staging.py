"""Writing so that a reader never sees half of anything: everything is built under a temporary
name beside its target and renamed into place. Every file and folder this package writes goes
through these helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `target`; when the block succeeds it replaces
    `target` (an older `target` is removed only then). On failure nothing at `target` changes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".partial-{target.name}-"))
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
    there is renamed into `folder` (replacing a file of that name), `last` after all others (a
    marker that says the rest is complete). On failure nothing in `folder` changes."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".partial-"))
    try:
        yield staging
        for path in sorted(staging.iterdir(), key=lambda path: path.name == last):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file(path: Path, data: str | bytes) -> None:
    """Write one file so that it appears whole or not at all."""
    with staged_files(path.parent) as staging:
        staged = staging / path.name
        staged.write_bytes(data.encode() if isinstance(data, str) else data)
