"""Writing so that a reader never sees half of anything: everything is built under a temporary
name beside its target and renamed into place. Every file and folder this package writes goes
through these helpers."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Collection, Iterator
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


def remove_partial_folders(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the staging folders a killed run left directly inside `folder` (only those staged
    for `name`, if given); returns them."""
    pattern = re.compile(re.escape(PARTIAL_PREFIX) + (re.escape(name) + r"-[0-9a-f]{8}" if name else ".*"))
    leftovers = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name)) if folder.is_dir() else []
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
def staged_files(folder: Path, last: str | None = None, remove: Collection[str] = ()) -> Iterator[Path]:
    """Yields an empty temporary folder; when the block succeeds the files written there replace
    those of the same names in `folder`, and the entries named in `remove` go. If the block fails
    nothing in `folder` changes.

    With `last`, the marker a reader needs to use the set (an SAE's cfg.json, a cache's
    cache.json), the set appears at once: a copy of `folder` is staged beside it (its other
    entries hard-linked, not copied) and exchanged with it in one atomic rename. Where the
    platform or filesystem cannot exchange two folders, the files are renamed in one by one, the
    old marker deleted first and the new one renamed in last: a reader then sees the old set, no
    marker, or the new set, never a mix, even if the process dies in between (the entries in
    `remove` are deleted after the old marker, before the new files)."""
    if last is not None and (swap := _swap_staging(folder)) is not None:
        staging = swap / _SWAP_CONTENT
        staging.mkdir()
        try:
            yield staging
            written = sorted(staging.iterdir())
            if _link_others(folder, swap, {path.name for path in written} | set(remove)):
                for path in written:
                    os.replace(path, swap / path.name)
                staging.rmdir()
                if _exchange(swap, folder):
                    return  # `swap` now holds the old folder; the finally removes it
                staging.mkdir()
                for path in written:
                    os.replace(swap / path.name, staging / path.name)
            _rename_into(staging, folder, last, remove)
        finally:
            shutil.rmtree(swap, ignore_errors=True)
        return
    staging = _staging_folder(folder, "files")
    try:
        yield staging
        _rename_into(staging, folder, last, remove)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# The block writes into this subfolder of the swap folder, so that the swap folder's other
# entries (links to the old folder's) never collide with what it writes.
_SWAP_CONTENT = ".staged"


def _rename_into(staging: Path, folder: Path, last: str | None, remove: Collection[str] = ()) -> None:
    """Rename each entry of `staging` into `folder`; `last` is deleted first and renamed last,
    the entries in `remove` deleted right after it."""
    if last is not None:
        (folder / last).unlink(missing_ok=True)
    for name in remove:
        stale = folder / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda path: (path.name == last, path.name)):
        os.replace(path, folder / path.name)


def _swap_staging(folder: Path) -> Path | None:
    """A staging folder beside `folder` for an exchange, with `folder`'s mode, owner and group, or
    None where exchanging is not possible or not safe: not Linux, a folder the current directory
    lies in (the process would be left in the old copy), a mount point (its parent is another
    filesystem: rename fails with EXDEV), a parent folder we cannot write to, or a folder whose
    owner or group we cannot give the copy (it would replace the folder with one of other
    ownership)."""
    if sys.platform != "linux" or not folder.is_dir():
        return None
    real = folder.resolve()  # exchange the folder a symlink points to, not the link
    if Path.cwd().is_relative_to(real) or os.stat(real.parent).st_dev != os.stat(real).st_dev:
        return None
    try:
        swap = _staging_folder(real.parent, real.name)
    except OSError:
        return None
    try:
        _copy_folder_identity(real, swap)
    except OSError:
        shutil.rmtree(swap, ignore_errors=True)
        return None
    return swap


def _copy_folder_identity(source: Path, target: Path) -> None:
    """Give `target` the owner, group and permission bits (setgid and sticky included) of
    `source`; chown first, since it clears the setgid bit."""
    stat = os.stat(source)
    now = os.stat(target)
    if (now.st_uid, now.st_gid) != (stat.st_uid, stat.st_gid):
        os.chown(target, stat.st_uid, stat.st_gid)
    os.chmod(target, stat.st_mode & 0o7777)


def _link_others(folder: Path, swap: Path, written: set[str]) -> bool:
    """Hard-link every entry of `folder` not in `written` into `swap` (folders recreated, files
    and symlinks linked); False, with nothing in `folder` changed, where links are not possible."""
    try:
        for entry in folder.iterdir():
            if entry.name in written:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, swap / entry.name, symlinks=True, copy_function=os.link)
            else:
                os.link(entry, swap / entry.name, follow_symlinks=False)
        return True
    except OSError:
        return False


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders at `a` and `b` in one atomic rename (Linux renameat2 RENAME_EXCHANGE);
    False where libc or the filesystem does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    old, new = os.fsencode(a.resolve()), os.fsencode(b.resolve())
    if renameat2(at_fdcwd, old, at_fdcwd, new, rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def write_file(path: Path, data: str | bytes) -> None:
    """Write one file so that it appears whole or not at all."""
    with staged_files(path.parent) as staging:
        staged = staging / path.name
        staged.write_bytes(data.encode() if isinstance(data, str) else data)
