"""Every tutorial runs top to bottom, at its quick size, so none can rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.py"))
# what each tutorial prints once its analysis has run
EXPECTED = {
    "01_kl_finetune_offline": "fraction of the CE gap closed",
    "02_circuits_before_after": "error node's share of the absolute attribution",
    "03_transcoders": "top transcoder latents on the last token",
    "04_comparisons": "each method's SAELens folder is under tutorial_methods/",
    "05_transcoder_set": "exported for circuit-tracer",
}


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
    assert EXPECTED[tutorial.stem] in result.stdout, result.stdout[-2000:]
