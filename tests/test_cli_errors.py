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
    # Enough text for ~2500 steps (~15 s here); the kill arrives once the first checkpoint is
    # written (not after a fixed time: on a busy machine the run may not have reached one yet).
    texts = tmp_path / "texts"
    texts.mkdir()
    for index in range(700):
        (texts / f"{index}.txt").write_text("\n".join(sentences(12, seed=index)))
    out = tmp_path / "o"
    args = ["finetune", "--sae", str(local_sae), "--model", str(tiny_lm_folder), "--data", str(texts)]
    args += ["--tokens", str(128 * 2500), "--context-size", "32", "--batch-size", "4", "--eval-tokens", "0"]
    stop = threading.Event()

    def kill_after_a_checkpoint() -> None:
        while not stop.is_set() and not list((out / "checkpoints").glob("[!.]*/kl_finetune_state.json")):
            stop.wait(0.05)
        if not stop.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    killer.start()
    try:
        code, err = run(capsys, *args, "--checkpoint-every-tokens", "1280", "--out", str(out))
    finally:
        stop.set()
        killer.join()
    assert code == 130
    assert f"--resume {out}" in err and "interrupted" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main restored the handler


def test_demo_control_that_is_not_a_loss(capsys, tmp_path) -> None:
    code, err = run(capsys, "demo", "--controls", "mse,kl-only", "--out", str(tmp_path / "o"))
    assert code == 2 and "--controls kl-only: not a loss" in err
    assert not (tmp_path / "o").exists()


def _damaged_sae_folders(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """SAE folders a user may hand over, each damaged one way, with what the error must say."""
    import json

    sae = make_sae("topk", hook_name="blocks.1.hook_resid_pre")
    folders = {}
    for name in ("unknown_architecture", "truncated_weights", "d_in_string"):
        sae.save_model(tmp_path / name)
    cfg = json.loads((tmp_path / "unknown_architecture" / "cfg.json").read_text())
    (tmp_path / "unknown_architecture" / "cfg.json").write_text(
        json.dumps({**cfg, "architecture": "nonsense"})
    )
    folders["unknown_architecture"] = (tmp_path / "unknown_architecture", "KeyError: 'nonsense'")
    weights = tmp_path / "truncated_weights" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    folders["truncated_weights"] = (tmp_path / "truncated_weights", "SafetensorError")
    (tmp_path / "d_in_string" / "cfg.json").write_text(json.dumps({**cfg, "d_in": "32"}))
    folders["d_in_string"] = (tmp_path / "d_in_string", "TypeError")
    return folders


def test_damaged_sae_folders_and_missing_models_are_one_line(capsys, tmp_path, local_sae: Path) -> None:
    for folder, cause in _damaged_sae_folders(tmp_path).values():
        code, err = run(capsys, "finetune", "--sae", str(folder), "--tokens", "100")
        assert code == 2 and f"--sae {folder}: cannot load the SAE folder ({cause}" in err
        assert len(err.strip().splitlines()) == 1
    code, err = run(capsys, "finetune", "--sae", str(local_sae), "--tokens", "100", "--model", "/nope/model")
    assert code == 2 and "Model '/nope/model': no such .gguf file or model folder" in err


def test_an_offline_hub_model_name_is_one_line(capsys, local_sae: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(capsys, "finetune", "--sae", str(local_sae), "--tokens", "100", "--model", "gpt2")
    assert code == 2 and "Could not load model 'gpt2'" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("out: 5", "out: 5 is not a string"),
        ("sae: [1]", "sae: [1] is not a"),
        ("device: 5", "device: 5 is not a string"),
        ("batch_size: true", "batch_size: True is not a"),
        ("context_size: 2.5", "context_size: 2.5 is not an integer"),
        (
            "downstream_hooks: blocks.2.hook_resid_post",
            "downstream_hooks: 'blocks.2.hook_resid_post' is not a list",
        ),
        ("overwrite: 1", "overwrite: 1 is not true or false"),
        ("loss: kl-only", "loss: 'kl-only' is not one of"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused(capsys, tmp_path, value: str, message: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(value + "\n")
    code, err = run(capsys, "finetune", "--config", str(config))
    assert code == 2 and f"--config {config}: {message}" in err


def test_eval_never_writes_over_a_fine_tunes_report(capsys, tmp_path, local_sae: Path) -> None:
    out = tmp_path / "tuned"
    out.mkdir()
    (out / "kl_finetune_metrics.json").write_text("{}")
    (out / "report.json").write_text('{"runs": "the fine-tune\'s"}')
    code, err = run(capsys, "eval", "--sae", str(local_sae), "--out", str(out), "--overwrite")
    assert code == 2 and "holds a fine-tuned SAE and its report; eval would replace it" in err
    assert (out / "report.json").read_text() == '{"runs": "the fine-tune\'s"}'


KILLED_CLI = """
import sys
from sae_lens_kl.cli import entry
sys.argv[0] = "sae-lens-kl"
entry()  # what the installed command runs
"""


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_during_start_up_once_or_twice_is_no_traceback(
    tmp_path, local_sae: Path, signals: int
) -> None:
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_CLI,
            "eval",
            "--sae",
            str(local_sae),
            "--model",
            str(tmp_path / "none"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # past the interpreter and cli imports (~0.2 s), inside torch and SAELens's (seconds)
    for _ in range(signals):
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
    err = process.communicate(timeout=60)[1]
    assert "Traceback" not in err, err
    assert process.returncode == 130 and "interrupted" in err


def test_an_interrupt_without_checkpoints_says_none_was_written(capsys, tiny_lm_folder, tmp_path) -> None:
    sae = make_sae("topk", hook_name="blocks.1.hook_resid_pre")
    sae.cfg.metadata.model_name = "tiny-lm"
    sae.save_model(tmp_path / "sae")
    texts = tmp_path / "texts"
    texts.mkdir()
    for index in range(700):
        (texts / f"{index}.txt").write_text("\n".join(sentences(12, seed=index)))
    out = tmp_path / "o"
    args = ["finetune", "--sae", str(tmp_path / "sae"), "--model", str(tiny_lm_folder), "--data", str(texts)]
    args += ["--tokens", str(128 * 2500), "--context-size", "32", "--batch-size", "4", "--eval-tokens", "0"]
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code, err = run(capsys, *args, "--out", str(out))
    finally:
        timer.cancel()
    assert code == 130 and "interrupted" in err
    assert "No checkpoint was written, so the run cannot be resumed" in err and "--resume" not in err


def test_resume_without_out_saves_into_the_run_folder(
    capsys, tiny_lm_folder, local_sae, text_folders, tmp_path
):
    out = tmp_path / "o"
    args = [
        "finetune",
        "--sae",
        str(local_sae),
        "--model",
        str(tiny_lm_folder),
        "--data",
        str(text_folders[0]),
    ]
    args += ["--tokens", "512", "--context-size", "32", "--batch-size", "4", "--eval-tokens", "0"]
    code, _ = run(capsys, *args, "--checkpoint-every-tokens", "128", "--out", str(out))
    assert code == 0
    finished = (out / "sae_weights.safetensors").read_bytes()
    (out / "report.md").write_text("stale")
    code, _ = run(
        capsys, *args, "--checkpoint-every-tokens", "128", "--resume", str(out / "checkpoints" / "256")
    )
    assert code == 0
    assert (out / "sae_weights.safetensors").read_bytes() == finished  # the same run, resumed
    assert (out / "report.md").read_text().startswith("# sae_lens_kl finetune")


def test_demo_mean_start_with_normalisation(capsys, tmp_path) -> None:
    code, err = run(
        capsys, "demo", "--normalize-activations", "expected_average_only_in", "--out", str(tmp_path / "o")
    )
    assert code == 2 and "pass --b-dec-init zeros with it" in err
    assert not (tmp_path / "o").exists()


def test_demo_continued_optimizer_with_normalisation(capsys, tmp_path) -> None:
    args = ["--normalize-activations", "expected_average_only_in", "--b-dec-init", "zeros"]
    code, err = run(capsys, "demo", *args, "--kl-optimizer", "continued", "--out", str(tmp_path / "o"))
    assert code == 2 and "--kl-optimizer continued with --normalize-activations" in err
    assert not (tmp_path / "o").exists()


def test_experiment_f_with_normalisation(capsys, tmp_path) -> None:
    # F's short arm continues the MSE phase's Adam (A.1): refused before the model loads
    args = ["--normalize-activations", "expected_average_only_in", "--b-dec-init", "zeros"]
    code, err = run(capsys, "experiment", "F", *args, "--out", str(tmp_path / "o"))
    assert code == 2 and "drop --normalize-activations for it" in err
    assert not (tmp_path / "o").exists()


def test_demo_negative_eval_tokens(capsys, tmp_path) -> None:
    code, err = run(capsys, "demo", "--eval-tokens", "-5", "--out", str(tmp_path / "o"))
    assert code == 2 and "--eval-tokens -5 must be >= 0" in err
    assert not (tmp_path / "o").exists()


def test_an_experiment_whose_seeds_the_data_cannot_hold(
    capsys, tmp_path, tiny_lm_folder: Path, text_folders: tuple[Path, Path]
) -> None:
    train_text, eval_text = text_folders
    args = ["experiment", "A", "--model", str(tiny_lm_folder), "--hook", "blocks.1.hook_resid_pre"]
    args += ["--d-sae", "64", "--k", "4", "--context-size", "32", "--mse-tokens", "2048", "--kl-steps", "2"]
    args += ["--eval-tokens", "256", "--data", str(train_text), "--eval-data", str(eval_text), "--quick"]
    # refused before the MSE phase, counting what its mixing buffer reads ahead of its tokens
    code, err = run(capsys, *args, "--seeds", "500", "--out", str(tmp_path / "out"))
    assert code == 2 and "holds fewer than the" in err and "what its mixing buffer reads ahead" in err
    assert not list(tmp_path.glob("out/*"))
