"""Real English text that a package registry serves: the documentation in Django's source
distribution (~650 reStructuredText files, ~1.6M SmolLM2 tokens, BSD-3), split by file into
training and held-out evaluation text and cached after the first fetch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sae_lens_kl.models import cache_root
from sae_lens_kl.staging import staged_folder

DJANGO_VERSION = "5.2.19"
EVAL_EVERY = 10  # every 10th documentation file (sorted by path) is held out


@dataclass(frozen=True)
class Corpus:
    train: Path
    """Folder of training text files."""
    eval: Path
    """Folder of held-out text files (disjoint files)."""


def django_docs(cache_dir: Path | None = None, version: str = DJANGO_VERSION) -> Corpus:
    """The Django docs corpus, fetched with pip from the package registry on first use."""
    root = (cache_dir or cache_root()) / "corpus" / f"django-{version}-docs"
    corpus = Corpus(root / "train", root / "eval")
    if corpus.train.is_dir() and corpus.eval.is_dir():
        return corpus
    with staged_folder(root) as staging:
        sdist = _download_sdist(version, staging / "download")
        with tarfile.open(sdist) as archive:
            members = sorted(
                (
                    m
                    for m in archive.getmembers()
                    if m.isfile() and "/docs/" in m.name and m.name.endswith(".txt")
                ),
                key=lambda m: m.name,
            )
            for index, member in enumerate(members):
                split = "eval" if index % EVAL_EVERY == 0 else "train"
                relative = member.name.split("/docs/", 1)[1].replace("/", "__")
                target = staging / split / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                extracted = archive.extractfile(member)
                assert extracted is not None
                target.write_bytes(extracted.read())
        shutil.rmtree(staging / "download")
    return corpus


def _download_sdist(version: str, into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--quiet",
        "-d",
        str(into),
        f"django=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    archives = list(into.glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise RuntimeError(
            f"Could not fetch Django {version}'s source distribution with pip (it holds the demo's "
            f"English text): {result.stderr.strip()[-500:]}. Check access to the package index, or "
            "pass your own text with --data/--eval-data."
        )
    return archives[0]
