"""A transcoder set exported to circuit-tracer's local format: read back by our loader with the
same outputs, refused when circuit-tracer would read something else, and (where circuit-tracer's
own environment is available: SAE_LENS_KL_CIRCUIT_TRACER_PYTHON, as CI sets it) read by
circuit-tracer 0.5.0's loaders, which compute what SAELens computes, and run through its
replacement model to an attribution graph."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_sae
from safetensors.torch import save_file

from sae_lens_kl.export import export_circuit_tracer, load_circuit_tracer
from sae_lens_kl.transcoders import reconstruct

ARCHITECTURES = ("transcoder", "jumprelu_skip_transcoder", "jumprelu_transcoder")
CHECK = Path(__file__).with_name("circuit_tracer_check.py")


def transcoder_set(architectures: tuple[str, ...] = ARCHITECTURES, **fields: object) -> list:
    """One transcoder per layer of the tiny model (mixed architectures are fine for the format)."""
    transcoders = []
    for layer, architecture in enumerate(architectures):
        t = make_sae(architecture, hook_name=f"blocks.{layer}.ln2.hook_normalized", seed=layer + 1, **fields)
        if "skip" in architecture:
            with torch.no_grad():
                t.W_skip.normal_(0, 0.1)
        transcoders.append(t)
    return transcoders


def test_export_reads_back_with_the_same_outputs(tmp_path) -> None:
    transcoders = transcoder_set()
    out = export_circuit_tracer(transcoders, tmp_path / "set", n_layers=3)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        *(f"layer_{i}.safetensors" for i in range(3)),
    ]
    again = load_circuit_tracer(out)
    x = torch.randn(7, transcoders[0].cfg.d_in, generator=torch.Generator().manual_seed(0))
    for before, after in zip(transcoders, again, strict=True):
        assert type(after) is type(before)
        assert after.cfg.metadata.hook_name_out == before.cfg.metadata.hook_name_out
        # the same float32 operations on the same weights: equal
        for ours, theirs in zip(reconstruct(before, x), reconstruct(after, x), strict=True):
            assert torch.equal(ours, theirs)


def test_what_circuit_tracer_would_read_otherwise_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a transcoder"):
        export_circuit_tracer([make_sae("topk")], tmp_path / "a")
    with pytest.raises(ValueError, match="every layer from 0"):
        export_circuit_tracer(transcoder_set()[1:], tmp_path / "b")
    with pytest.raises(ValueError, match="every layer from 0"):
        export_circuit_tracer(transcoder_set()[:2], tmp_path / "c", n_layers=3)
    negative = transcoder_set(("jumprelu_transcoder",))
    with torch.no_grad():
        negative[0].threshold[0] = -0.1
    with pytest.raises(ValueError, match="negative"):
        export_circuit_tracer(negative, tmp_path / "d")
    widths = transcoder_set(("transcoder",)) + [
        make_sae("transcoder", hook_name="blocks.1.ln2.hook_normalized", d_sae=48)
    ]
    with pytest.raises(ValueError, match="widths"):
        export_circuit_tracer(widths, tmp_path / "e")
    assert not any((tmp_path / name).exists() for name in "abcde")
    # a folder of other files is never replaced, even with overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        export_circuit_tracer(transcoder_set(), tmp_path / "mine")
    with pytest.raises(FileExistsError, match="not a transcoder set"):
        export_circuit_tracer(transcoder_set(), tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # an earlier export is replaced with overwrite
    export_circuit_tracer(transcoder_set(), tmp_path / "set")
    export_circuit_tracer(transcoder_set(), tmp_path / "set", overwrite=True)


def test_circuit_tracers_own_loader_and_replacement_model_read_the_export(tmp_path) -> None:
    python = os.environ.get("SAE_LENS_KL_CIRCUIT_TRACER_PYTHON")
    if not python:
        pytest.skip(
            "circuit-tracer 0.5.0 needs its own environment (it pins transformers <= 4.57.3): "
            "python3 -m venv .venv-circuit-tracer && .venv-circuit-tracer/bin/pip install "
            "torch==2.13.0 circuit-tracer==0.5.0, then SAE_LENS_KL_CIRCUIT_TRACER_PYTHON="
            ".venv-circuit-tracer/bin/python (.ci/run does this)."
        )
    transcoders = [t.to(torch.float64) for t in transcoder_set()]
    export_circuit_tracer(transcoders, tmp_path / "set", n_layers=3)
    expected = {}
    generator = torch.Generator().manual_seed(1)
    for layer, t in enumerate(transcoders):
        x = torch.randn(9, t.cfg.d_in, generator=generator, dtype=torch.float64)
        output, acts = reconstruct(t, x)
        expected |= {f"input_{layer}": x, f"acts_{layer}": acts.detach(), f"output_{layer}": output.detach()}
    save_file(expected, str(tmp_path / "expected.safetensors"))
    run = subprocess.run(
        [python, str(CHECK), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["layers"] == 3
    # float64 on both sides, the same products: rounding only (u = 1.1e-16 on sums of ~100 terms)
    assert report["max_abs_error"] < 1e-12
    assert report["active_features"] > 0 and report["adjacency"][0] == report["adjacency"][1] > 0


def test_the_export_command_writes_a_run_folders_set(tmp_path) -> None:
    from sae_lens_kl.cli import main

    for index, t in enumerate(transcoder_set()):
        t.save_model(str(tmp_path / "run" / f"sae_{index}"))
    command = ["export", "circuit-tracer", "--n-layers", "3", "--out"]
    assert main([*command, str(tmp_path / "ct"), "--set", str(tmp_path / "run")]) == 0
    assert len(load_circuit_tracer(tmp_path / "ct")) == 3
    # one transcoder of layer 1 is no set of 3 layers; nor is a set without --n-layers
    assert main([*command, str(tmp_path / "x"), "--set", str(tmp_path / "run" / "sae_1")]) == 2
    assert (
        main(["export", "circuit-tracer", "--out", str(tmp_path / "x"), "--set", str(tmp_path / "run")]) == 2
    )
    assert not (tmp_path / "x").exists()


def test_the_files_compute_what_circuit_tracer_computes_from_them(tmp_path) -> None:
    # circuit-tracer 0.5.0's math on its files (single_layer_transcoder.py: encode, decode,
    # compute_skip; activation_functions.py: JumpReLU x * (x > threshold)), written out here, gives
    # SAELens's outputs: a check of the convention (W_enc's transpose) independent of our reader.
    from safetensors.torch import load_file

    transcoders = [t.to(torch.float64) for t in transcoder_set()]
    out = export_circuit_tracer(transcoders, tmp_path / "set", n_layers=3)
    x = torch.randn(
        5, transcoders[0].cfg.d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    for layer, transcoder in enumerate(transcoders):
        files = {k: v.double() for k, v in load_file(str(out / f"layer_{layer}.safetensors")).items()}
        pre = x @ files["W_enc"].T + files["b_enc"]
        threshold = files.get("activation_function.threshold")
        acts = pre.relu() if threshold is None else pre * (pre > threshold)
        output = acts @ files["W_dec"] + files["b_dec"] + (x @ files["W_skip"].T if "W_skip" in files else 0)
        expected, _ = reconstruct(transcoder, x)
        # float32 files of float64 weights: relative rounding 6e-8 per weight over sums of ~100 terms
        assert (output - expected).abs().max() <= 1e-5 * (1 + expected.abs().max())
