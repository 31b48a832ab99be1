"""`evaluate_saebench` / `sae-lens-kl saebench`: bad input is one clear error before any model
loads, with or without the [saebench] extra installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_sae

from sae_lens_kl.cli import main
from sae_lens_kl.saebench import INSTALL, SAEBenchError, check_evals, check_names, check_out, check_saes


def test_unknown_eval_lists_the_known_ones() -> None:
    with pytest.raises(SAEBenchError, match=r"Unknown eval absorbtion; known evals: core, absorption, meta"):
        check_evals(["core", "absorbtion"])


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("sparse_probing", "LabHC/bias_in_bios_class_set1"),
        ("scr", "canrager/amazon_reviews_mcauley_1and5"),
        ("ravel", "adamkarvonen/ravel_prompts"),
        ("autointerp", "OpenAI API key"),
    ],
)
def test_evals_that_need_the_hub_or_a_key_fail_up_front_naming_it(name: str, needs: str) -> None:
    with pytest.raises(SAEBenchError, match=needs):
        check_evals(["core", name])


def test_saes_at_different_hooks_or_of_another_model_are_refused() -> None:
    a = make_sae("standard", hook_name="blocks.1.hook_resid_pre")
    b = make_sae("standard", hook_name="blocks.2.hook_resid_pre")
    with pytest.raises(SAEBenchError, match="read different hooks"):
        check_saes({"before": a, "after": b}, "tiny-test-model")
    with pytest.raises(SAEBenchError, match="trained on model 'tiny-test-model', not 'gpt2'"):
        check_saes({"before": a}, "gpt2")
    # TransformerLens aliases name one model
    a.cfg.metadata.model_name = "gpt2-small"
    assert check_saes({"before": a}, "gpt2") == "blocks.1.hook_resid_pre"


def test_names_and_output_folder(tmp_path) -> None:
    with pytest.raises(SAEBenchError, match="cannot name result files"):
        check_names({"before/1": None})
    (tmp_path / "file").write_text("x")
    with pytest.raises(SAEBenchError, match="is a file; pass a folder"):
        check_out(tmp_path / "file")


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys) -> None:
    folder = tmp_path / "sae"
    make_sae("standard").save_model(folder)
    (tmp_path / "file").write_text("x")
    cases = {
        ("--sae", str(folder), "--evals", "core"): "write NAME=PATH_OR_RELEASE:SAE_ID",
        ("--sae", f"before={folder}", "--sae", f"after={folder}", "--evals", "absorbtion"): "known evals",
        ("--sae", f"a={folder}", "--sae", f"b={folder}", "--out", str(tmp_path / "file")): "is a file",
        ("--sae", f"after={folder}", "--evals", "core"): "give a second SAE",
        (
            "--sae",
            f"a={folder}",
            "--sae",
            f"b={folder}",
            "--eval-config",
            "{core",
        ): "--eval-config is not JSON",
    }
    for argv, message in cases.items():
        assert main(["saebench", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_without_the_extra_the_command_names_the_install_line(tmp_path) -> None:
    folder = tmp_path / "sae"
    make_sae("standard").save_model(folder)
    # sys.modules[name] = None is Python's own way to make `import name` fail
    argv = ["saebench", "--sae", f"a={folder}", "--sae", f"b={folder}", "--out", str(tmp_path / "o")]
    code = "import sys; sys.modules['sae_bench'] = None; from sae_lens_kl.cli import main; "
    code += f"sys.exit(main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert INSTALL in result.stderr
    assert not (tmp_path / "o").exists()


def test_start_sae_takes_one_source_per_sae() -> None:
    from conftest import random_tokens, tiny_model

    from sae_lens_kl import kl_finetune

    saes = [make_sae("topk"), make_sae("topk", seed=2)]
    with pytest.raises(ValueError, match=r"start_sae: pass one source per SAE \(2\)"):
        kl_finetune(saes, tiny_model(), random_tokens(8), tokens=64, start_sae="release:id")


def test_an_sae_of_another_width_is_refused_before_any_eval(tmp_path) -> None:
    from conftest import tiny_model

    from sae_lens_kl.saebench import evaluate_saebench

    wide = make_sae("standard", d_in=48)
    with pytest.raises(
        SAEBenchError, match="reads 48 dimensions; tiny-test-model has 32 at blocks.1.hook_resid_pre"
    ):
        evaluate_saebench({"before": wide}, tiny_model(), ["meta_structure"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
