"""Bad command lines: one clear line each naming the problem, exit code 2, no traceback, and no
output folder left half-written."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import make_sae, sentences

from sae_lens_kl.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def local_sae(tmp_path) -> Path:
    folder = tmp_path / "sae"
    sae = make_sae("topk", hook_name="blocks.1.hook_resid_pre")
    sae.cfg.metadata.model_name = "tiny-lm"
    sae.save_model(folder)
    return folder


def test_config_file_problems(capsys, tmp_path) -> None:
    code, err = run(capsys, "finetune", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml: cannot read it" in err
    bad_json = tmp_path / "run.json"
    bad_json.write_text("{tokens: 5")
    code, err = run(capsys, "finetune", "--config", str(bad_json))
    assert code == 2 and "run.json: not valid JSON" in err
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("tokens: [5\nlr: 1")
    code, err = run(capsys, "finetune", "--config", str(bad_yaml))
    assert code == 2 and "run.yaml: not valid YAML" in err


def test_threads_must_be_positive(capsys) -> None:
    code, err = run(capsys, "eval", "--threads", "0")
    assert code == 2 and "0 is not a positive integer" in err


def test_sae_path_that_does_not_exist(capsys, tmp_path) -> None:
    code, err = run(capsys, "finetune", "--sae", "./nope:x", "--tokens", "100", "--out", str(tmp_path / "o"))
    assert code == 2 and "--sae ./nope:x: no SAE folder there" in err
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file(capsys, tmp_path, local_sae: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, err = run(
        capsys, "finetune", "--sae", str(local_sae), "--tokens", "100", "--out", str(tmp_path / "file")
    )
    assert code == 2 and "is a file" in err


def test_bad_option_value(capsys, tmp_path, local_sae: Path) -> None:
    out = tmp_path / "o"
    code, err = run(
        capsys, "finetune", "--sae", str(local_sae), "--tokens", "100", "--lr", "inf", "--out", str(out)
    )
    assert code == 2 and "lr=inf must be a finite number" in err
    assert not out.exists()


def test_head_index_out_of_range(capsys, tiny_lm_folder: Path, text_folders, tmp_path) -> None:
    sae = make_sae("topk", hook_name="blocks.1.attn.hook_z", d_in=8, head_index=9)
    sae.cfg.metadata.model_name = "tiny-lm"
    sae.save_model(tmp_path / "sae")
    args = ["finetune", "--sae", str(tmp_path / "sae"), "--model", str(tiny_lm_folder), "--tokens", "256"]
    code, err = run(capsys, *args, "--data", str(text_folders[0]), "--out", str(tmp_path / "o"))
    assert code == 2 and "hook_head_index=9 is not a head of this model (0 to 3)" in err
    assert not (tmp_path / "o").exists()


def test_eval_token_counts(capsys, tiny_lm_folder: Path, text_folders, local_sae: Path) -> None:
    args = ["eval", "--sae", str(local_sae), "--model", str(tiny_lm_folder), "--data", str(text_folders[1])]
    code, err = run(capsys, *args, "--n-tokens", "0")
    assert code == 2 and "n_tokens=0 must be a positive number" in err
    code, err = run(capsys, *args, "--n-tokens", "100000000")
    assert code == 2 and "lower n_tokens or pass more data" in err


def test_sigterm_during_a_run_says_how_to_resume(capsys, tiny_lm_folder: Path, local_sae, tmp_path) -> None:
    # Enough text for ~2500 steps (~15 s here); the kill arrives after 2 s, wherever the run is.
    texts = tmp_path / "texts"
    texts.mkdir()
    for index in range(700):
        (texts / f"{index}.txt").write_text("\n".join(sentences(12, seed=index)))
    out = tmp_path / "o"
    args = ["finetune", "--sae", str(local_sae), "--model", str(tiny_lm_folder), "--data", str(texts)]
    args += ["--tokens", str(128 * 2500), "--context-size", "32", "--batch-size", "4", "--eval-tokens", "0"]
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code, err = run(capsys, *args, "--checkpoint-every-tokens", "1280", "--out", str(out))
    finally:
        timer.cancel()
    assert code == 130
    assert f"--resume {out}" in err and "interrupted" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main restored the handler


def test_demo_control_that_is_not_a_loss(capsys, tmp_path) -> None:
    code, err = run(capsys, "demo", "--controls", "mse,kl-only", "--out", str(tmp_path / "o"))
    assert code == 2 and "--controls kl-only: not a loss" in err
    assert not (tmp_path / "o").exists()
