"""A save_dir never loses what is in it: replacement keeps the folder's identity and works on a
mount point (trust issue II)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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
