"""Data parallelism: two CPU processes (gloo, launched by torchrun) against one process on the same
global batches. tests/distributed_worker.py is what each rank runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_sae
from distributed_worker import DATA, OPTIONS, model, sae
from sae_lens import SAE
from safetensors.torch import load_file

from sae_lens_kl import kl_finetune
from sae_lens_kl.parallel import DataParallel

WORKER = Path(__file__).parent / "distributed_worker.py"
METRICS = ("ce_spliced", "kl", "mse", "l0", "explained_variance", "n_tokens")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's runs on 2 ranks (one torchrun launch for the module)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*launch, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "sae_weights.safetensors")


def metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "kl_finetune_metrics.json").read_text())


def assert_same_run(distributed: Path, single: Path) -> None:
    """Weights and held-out numbers equal to float64 rounding: the runs sum the same products in
    another order (per-rank partial sums, then the all-reduce), a relative difference of a few
    ulps per step that Adam passes on; 1e-9 leaves a margin of > 1e4 over 6 steps."""
    ours, theirs = weights(distributed), weights(single)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12, msg=name)
    for when in ("before", "after"):
        mine, reference = metrics(distributed)[when], metrics(single)[when]
        for name in METRICS:
            assert mine[name] == pytest.approx(reference[name], rel=1e-9, abs=1e-12), (when, name)


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_two_ranks_equal_one_process(two_ranks: Path, tmp_path: Path, architecture: str) -> None:
    kl_finetune(sae(architecture), model(), DATA, save_dir=tmp_path, **OPTIONS)
    assert_same_run(two_ranks / architecture, tmp_path)
    report = metrics(two_ranks / architecture)
    assert report["after"]["kl"] < report["before"]["kl"]
    assert report["training_tokens"] == OPTIONS["tokens"]
    if architecture == "standard":  # the controller saw the same (global) L0 on both ranks
        assert report["sparsity_controller"] == metrics(tmp_path)["sparsity_controller"]


def test_killed_two_rank_run_resumes_to_the_same_weights(two_ranks: Path) -> None:
    resumed, uninterrupted = weights(two_ranks / "killed"), weights(two_ranks / "topk")
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert metrics(two_ranks / "killed")["resumed_from_tokens"] > 0


def test_several_saes_per_pass_and_the_cache_on_two_ranks(two_ranks: Path, tmp_path: Path) -> None:
    single = tmp_path / "multi"
    kl_finetune([sae(), sae("topk", "blocks.2.hook_resid_pre")], model(), DATA, save_dir=single, **OPTIONS)
    for index in range(2):
        assert_same_run(two_ranks / "multi" / f"sae_{index}", single / f"sae_{index}")
    kl_finetune(sae(), model(), two_ranks / "cache", save_dir=tmp_path / "cached", **OPTIONS)
    assert_same_run(two_ranks / "cached", tmp_path / "cached")


def test_bad_input_on_two_ranks(two_ranks: Path) -> None:
    for rank in range(2):
        errors = json.loads((two_ranks / f"errors_rank{rank}.json").read_text())
        assert "ranks of this distributed fine-tune were given different settings" in errors["different_lr"]
        assert "batch_size=3 is the global batch, split over 2 processes" in errors["odd_batch"]
    for name in ("different_lr", "odd_batch"):  # refused before anything was written
        assert not (two_ranks / name).exists() or not any((two_ranks / name).iterdir())


def test_resume_with_another_number_of_processes_is_refused(two_ranks: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="written by a run of 2 process"):
        kl_finetune(sae(), model(), DATA, save_dir=tmp_path, resume_from=two_ranks / "killed", **OPTIONS)
    assert not any(tmp_path.iterdir())


def test_distributed_without_a_process_group_is_refused() -> None:
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        kl_finetune(sae(), model(), DATA, distributed=True, **OPTIONS)


def test_a_rank_takes_its_contiguous_share() -> None:
    batch = torch.arange(8)
    parts = [DataParallel(rank, 4).part(batch) for rank in range(4)]
    assert torch.equal(torch.cat(parts), batch)
    shares = [DataParallel(rank, 3).parts(list(range(7))) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launch, "-m", "sae_lens_kl", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_the_command_under_torchrun(
    tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "sae"
    start = make_sae("topk", hook_name="blocks.1.hook_resid_pre")
    start.cfg.metadata.model_name = "tiny-lm"
    start.save_model(folder)
    train, held_out = text_folders
    common = ["finetune", "--sae", str(folder), "--model", str(tiny_lm_folder), "--data", str(train)]
    common += ["--eval-data", str(held_out), "--tokens", "512", "--batch-size", "4", "--context-size", "16"]
    common += ["--eval-tokens", "128"]

    refused = torchrun(*common, "--out", str(tmp_path / "refused"))
    assert refused.returncode != 0
    assert "launched as 2 processes (torchrun) without --distributed" in refused.stderr
    assert not (tmp_path / "refused").exists()

    result = torchrun(*common, "--distributed", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-5000:]
    report = metrics(tmp_path / "out")
    assert report["processes"] == 2 and report["training_tokens"] == 512
    assert report["after"]["kl"] < report["before"]["kl"]
    assert result.stdout.count("CE gap") == (tmp_path / "out" / "report.md").read_text().count("CE gap")
    assert SAE.load_from_disk(tmp_path / "out").cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
