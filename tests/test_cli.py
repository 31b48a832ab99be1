"""The command line: complete --help, options from config files, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest

from sae_lens_kl import KLFinetuneConfig
from sae_lens_kl.cli import build_parser, config_from_args, parse
from sae_lens_kl.commands import load_sae
from sae_lens_kl.flags import field_docs


@pytest.mark.parametrize("command", ["demo", "finetune", "train", "cache", "eval", "experiment"])
def test_every_subcommand_has_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_kl", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "usage: sae-lens-kl" in result.stdout
    assert "default" in result.stdout


def test_every_config_field_is_a_documented_flag() -> None:
    docs = field_docs(KLFinetuneConfig)
    assert set(docs) == {f.name for f in fields(KLFinetuneConfig)}
    help_text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()  # type: ignore[union-attr]
    for field in fields(KLFinetuneConfig):
        assert "--" + field.name.replace("_", "-") in help_text, field.name


def test_flags_map_onto_the_config() -> None:
    args = parse(
        [
            "finetune",
            "--sae",
            "x:y",
            "--tokens",
            "5000",
            "--loss",
            "kl",
            "--lr",
            "1e-4",
            "--no-exclude-special-tokens",
            "--target-l0",
            "40",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.tokens, cfg.loss, cfg.lr, cfg.exclude_special_tokens, cfg.target_l0) == (
        5000,
        "kl",
        1e-4,
        False,
        40.0,
    )
    assert cfg.batch_size == KLFinetuneConfig(tokens=1).batch_size
    assert config_from_args(parse(["finetune", "--tokens", "5", "--wandb"])).log_to_wandb is True


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_options_from_a_config_file_and_flags_win(tmp_path, suffix: str) -> None:
    path = tmp_path / f"run{suffix}"
    values = {"tokens": 1234, "lr": 3e-4, "batch-size": 8}
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("tokens: 1234\nlr: 0.0003\nbatch-size: 8\n")
    args = parse(["finetune", "--config", str(path), "--lr", "1e-3"])
    assert (args.tokens, args.lr, args.batch_size) == (1234, 1e-3, 8)
    path.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(SystemExit):
        parse(["finetune", "--config", str(path)])


def test_unknown_release_lists_close_matches() -> None:
    with pytest.raises(SystemExit, match="gpt2-small-res-jb"):
        load_sae("gpt2-small-res-j:blocks.8.hook_resid_pre")
    with pytest.raises(SystemExit, match="blocks.8.hook_resid_pre"):
        load_sae("gpt2-small-res-jb:blocks.8.hook_resid_pree")


def test_help_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from sae_lens_kl.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'sae_lens', 'transformer_lens') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_names_resolve_to_what_they_name() -> None:
    # The package loads its names lazily; none may resolve to a submodule of the same name.
    import importlib
    import pkgutil
    import types

    import sae_lens_kl

    for module in pkgutil.iter_modules(sae_lens_kl.__path__):
        if module.name != "__main__":  # (runs the command line)
            importlib.import_module(f"sae_lens_kl.{module.name}")
    for name in sae_lens_kl.__all__:
        assert not isinstance(getattr(sae_lens_kl, name), types.ModuleType), name


def test_choices_and_defaults_come_from_the_registries() -> None:
    # the CLI stays light (no torch at --help), so where a registry lives in a heavy module its
    # names are a Literal in config.py and these must agree
    from typing import get_args

    from sae_lens_kl.config import ExperimentName
    from sae_lens_kl.experiments import EXPERIMENTS
    from sae_lens_kl.options import SAEBenchOptions
    from sae_lens_kl.saebench import OFFLINE_EVALS

    assert list(get_args(ExperimentName)) == list(EXPERIMENTS)
    assert SAEBenchOptions().evals.split(",") == list(OFFLINE_EVALS)


def test_flags_default_to_the_configs_defaults() -> None:
    # Every generated fine-tune flag parses to KLFinetuneConfig's own default, `bool | None`
    # options (decided from the SAE when None) included: the CLI and the API train alike.
    defaults = {f.name: f.default for f in fields(KLFinetuneConfig) if f.name != "tokens"}
    for command in (["finetune"], ["train"]):
        parsed = vars(parse(command))
        for name, default in defaults.items():
            if name in parsed and name not in ("context_size", "continue_optimizer_from"):
                assert parsed[name] == default, (command, name, parsed[name], default)
