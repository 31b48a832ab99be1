"""Every tutorial runs top to bottom, at its quick size, so none can rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.py"))


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_the_tutorial_runs(tutorial: Path, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(tutorial)],
        cwd=tmp_path,
        env={**os.environ, "SAE_LENS_KL_QUICK": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fraction of the CE gap closed" in result.stdout
