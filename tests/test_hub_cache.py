"""The one-call path with SAE.from_pretrained, against a real Hugging Face hub cache (offline)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import SAE

from sae_lens_kl import kl_finetune

REPO = "tiny-org/tiny-saes"
SAE_ID = "blocks.1.hook_resid_pre"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The layout huggingface_hub writes: content-addressed blobs, a snapshot of symlinks per
    commit, and refs/main naming the commit."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_from_pretrained_from_a_real_hub_cache_then_finetune_then_load(tmp_path, monkeypatch) -> None:
    from huggingface_hub import scan_cache_dir

    original = make_sae("topk")
    original.save_model(tmp_path / "export")
    cache = tmp_path / "hub"
    write_hub_cache(cache, REPO, {f"{SAE_ID}/{p.name}": p for p in (tmp_path / "export").iterdir()})
    # huggingface_hub itself must recognise the cache as valid
    report = scan_cache_dir(cache)
    assert not report.warnings and [r.repo_id for r in report.repos] == [REPO]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    # huggingface_hub reads both variables when it is first imported, so set its copies too

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    # no network and no such cached file: the hub client is really consulted, and says so
    with pytest.raises(Exception, match="(?i)offline|cache|connect"):
        SAE.from_pretrained(REPO, "blocks.2.hook_resid_pre")

    sae = SAE.from_pretrained(REPO, SAE_ID)
    x = torch.randn(10, 32)
    with torch.no_grad():
        assert torch.equal(sae(x), original(x))

    tuned = kl_finetune(
        sae,
        tiny_model(),
        random_tokens(40, seq=16),
        tokens=3 * 4 * 16,
        lr=1e-3,
        batch_size=4,
        eval_tokens=8 * 16,
        save_dir=tmp_path / "tuned",
    )
    loaded = SAE.load_from_disk(tmp_path / "tuned")
    with torch.no_grad():
        assert torch.equal(loaded(x), tuned(x))
        assert not torch.equal(loaded(x), sae(x))
    shutil.rmtree(cache)
