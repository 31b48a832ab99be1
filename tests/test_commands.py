"""Every `sae-lens-kl` subcommand end to end on a tiny local model and local text (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from sae_lens_kl.cache import CleanPassCache
from sae_lens_kl.cli import main
from sae_lens_kl.losses import OBJECTIVES
from sae_lens_kl.recipes import KL_BATCH_SEQUENCES

TRAIN_SIZES = [
    "--hook", "blocks.1.hook_resid_pre", "--architecture", "topk", "--k", "4", "--d-sae", "64",
    "--training-tokens", "3072", "--kl-fraction", "0.25", "--context-size", "32", "--batch-size", "4",
    "--eval-tokens", "256", "--lr", "1e-3", "--train-batch-size-tokens", "256",
]  # fmt: skip


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> None:
    # The demo caches its MSE phase; keep that inside the test's folder.
    monkeypatch.setenv("SAE_LENS_KL_CACHE", str(tmp_path / "cache"))


def test_train_cache_finetune_eval(tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path) -> None:
    model, (train_text, eval_text) = str(tiny_lm_folder), text_folders
    data = ["--data", str(train_text), "--eval-data", str(eval_text)]
    assert main(["train", "--model", model, *TRAIN_SIZES, *data, "--out", str(tmp_path / "trained")]) == 0
    trained = json.loads((tmp_path / "trained" / "report.json").read_text())["runs"]["KL+MSE"]
    assert trained["training_tokens"] == 768 and trained["after"]["n_tokens"] > 0
    assert (tmp_path / "trained" / "training_curves.png").is_file()
    sae = SAE.load_from_disk(tmp_path / "trained")
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"

    cache = ["cache", "--model", model, "--hook", "blocks.1.hook_resid_pre", "--data", str(train_text)]
    assert (
        main([*cache, "--tokens", "1024", "--context-size", "32", "--out", str(tmp_path / "cache_run")]) == 0
    )
    assert (tmp_path / "cache_run" / "cache.json").is_file()

    finetune = ["finetune", "--sae", str(tmp_path / "trained"), "--model", model]
    finetune += ["--data", str(tmp_path / "cache_run"), "--tokens", "256", "--batch-size", "4"]
    assert main([*finetune, "--eval-tokens", "128", "--lr", "1e-3", "--out", str(tmp_path / "tuned")]) == 0
    tuned = SAE.load_from_disk(tmp_path / "tuned")
    assert not torch.equal(tuned.W_dec, sae.W_dec)
    assert tuned.cfg.metadata.kl_finetune["start_sae"] == str((tmp_path / "trained").resolve())

    evaluate = [
        "eval",
        "--sae",
        str(tmp_path / "trained"),
        "--sae",
        str(tmp_path / "tuned"),
        "--model",
        model,
    ]
    assert (
        main([*evaluate, "--data", str(eval_text), "--n-tokens", "256", "--out", str(tmp_path / "eval")]) == 0
    )
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(rows) == {str(tmp_path / "trained"), str(tmp_path / "tuned")}
    assert all(row["n_tokens"] > 0 for row in rows.values())

    circuits = ["circuits", "--sae", f"before={tmp_path / 'trained'}", "--sae", f"after={tmp_path / 'tuned'}"]
    circuits += ["--model", model, "--data", str(eval_text), "--prompts", "4", "--length", "8"]
    circuits += ["--method", "ig", "--ig-steps", "2"]
    assert main([*circuits, "--sizes", "1,4,64", "--out", str(tmp_path / "circuits")]) == 0
    result = json.loads((tmp_path / "circuits" / "circuits.json").read_text())
    assert 0 <= result["accuracy"] <= 1 and (tmp_path / "circuits" / "circuits.png").is_file()
    for name in ("before", "after"):
        assert 0 <= result[name]["error_share"]["blocks.1.hook_resid_pre"] <= 1
        assert result[name]["faithfulness"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert main(["circuits", "--sae", str(tmp_path / "trained"), "--model", model]) == 2  # no NAME=
    # a name repeated groups SAEs at several hooks into one circuit: one SAE per hook
    twice = ["circuits", "--sae", f"a={tmp_path / 'trained'}", "--sae", f"a={tmp_path / 'tuned'}"]
    assert main([*twice, "--model", model]) == 2


def test_demo_at_a_tiny_size(tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path) -> None:
    train_text, eval_text = text_folders
    args = ["demo", "--model", str(tiny_lm_folder), "--hook", "blocks.1.hook_resid_post", "--d-sae", "64"]
    args += ["--k", "4", "--context-size", "32", "--mse-tokens", "2048", "--kl-steps", "2"]
    args += ["--eval-tokens", "256", "--data", str(train_text), "--eval-data", str(eval_text)]
    assert main([*args, "--controls", "mse,kl", "--out", str(tmp_path / "demo")]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert set(report["runs"]) == {"KL+MSE", "MSE-only control", "KL-only"}
    # every run starts from the same MSE-phase SAE, evaluated on the same held-out tokens
    assert len({json.dumps(run["before"], sort_keys=True) for run in report["runs"].values()}) == 1
    assert report["mse_phase_cached"] is False
    for run in report["runs"].values():
        assert run["training_tokens"] == 2 * KL_BATCH_SEQUENCES * 32
    # every arm (none reads after the SAE's hook) trained from one clean-pass cache of the KL tokens
    assert report["kl_clean_pass"] == "clean-pass cache"
    (cache_json,) = (tmp_path / "cache" / "clean_passes").glob("*/cache.json")
    cache = CleanPassCache(cache_json.parent)
    assert cache.n_sequences == 2 * KL_BATCH_SEQUENCES and cache.hook_name == "blocks.1.hook_resid_post"
    for run in report["runs"].values():
        assert run["data"]["source"] == f"CleanPassCache {cache.path}"
    built = cache_json.stat().st_mtime_ns
    # ... which each report names, so `sae-lens-kl saebench --sae after=<run folder>` finds it
    (start,) = {run["start_sae"] for run in report["runs"].values()}
    assert SAE.load_from_disk(start).cfg.d_sae == 64
    # The MSE phase is cached: a second run reads it back and trains the same KL phase.
    assert main([*args, "--out", str(tmp_path / "demo"), "--overwrite", "--no-control"]) == 0
    again = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert again["mse_phase_cached"] is True
    assert again["runs"]["KL+MSE"]["after"] == report["runs"]["KL+MSE"]["after"]
    assert cache_json.stat().st_mtime_ns == built  # ... from the clean-pass cache the first run built
    # --no-kl-cache: the clean pass at every step, from the tokens
    assert main([*args, "--out", str(tmp_path / "online"), "--no-control", "--no-kl-cache"]) == 0
    online = json.loads((tmp_path / "online" / "report.json").read_text())
    assert online["kl_clean_pass"] == "every step"
    assert online["runs"]["KL+MSE"]["data"]["source"] == f"token tensor {(2 * KL_BATCH_SEQUENCES, 32)}"


def test_demo_can_continue_the_mse_phase_optimizer(
    tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path
) -> None:
    from sae_lens.constants import TRAINER_STATE_FILENAME

    train_text, eval_text = text_folders
    args = ["demo", "--model", str(tiny_lm_folder), "--hook", "blocks.1.hook_resid_post", "--d-sae", "64"]
    args += ["--k", "4", "--context-size", "32", "--mse-tokens", "2048", "--kl-steps", "2", "--eval-tokens"]
    args += ["256", "--data", str(train_text), "--eval-data", str(eval_text), "--lr", "1e-3"]

    def kl_mse_run(*flags: str) -> dict:
        assert main([*args, *flags, "--out", str(tmp_path / "demo"), "--overwrite"]) == 0
        report = json.loads((tmp_path / "demo" / "report.json").read_text())
        return {**report["runs"]["KL+MSE"], "mse_phase_cached": report["mse_phase_cached"]}

    fresh = kl_mse_run()
    cache = Path(fresh["start_sae"])
    assert (cache / TRAINER_STATE_FILENAME).is_file()  # the MSE phase's Adam is cached with its SAE
    assert fresh["config"]["continue_optimizer_from"] is None
    continued = kl_mse_run("--kl-optimizer", "continued")
    assert continued["mse_phase_cached"] and continued["config"]["continue_optimizer_from"] == str(cache)
    assert continued["after"] != fresh["after"]  # the same tokens and lr: the optimizer's moments differ
    # an SAE cached without its Adam state (by an older version) is trained again for a continued run
    (cache / TRAINER_STATE_FILENAME).unlink()
    weights = (cache / "sae_weights.safetensors").read_bytes()
    again = kl_mse_run("--kl-optimizer", "continued", "--no-control")
    assert not again["mse_phase_cached"]  # trained again, to the same weights, which stay cached
    assert again["after"] == continued["after"]
    assert (cache / "sae_weights.safetensors").read_bytes() == weights
    # ... but a cached SAE that training again does not reproduce is never replaced
    from safetensors.torch import load_file, save_file

    tensors = load_file(cache / "sae_weights.safetensors")
    save_file({**tensors, "W_enc": tensors["W_enc"] * 1.5}, cache / "sae_weights.safetensors")
    (cache / TRAINER_STATE_FILENAME).unlink()
    changed = (cache / "sae_weights.safetensors").read_bytes()
    assert main([*args, "--kl-optimizer", "continued", "--out", str(tmp_path / "other")]) == 2
    assert (cache / "sae_weights.safetensors").read_bytes() == changed


def test_train_seed_reaches_the_mse_phase(
    tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path
) -> None:
    data = ["--data", str(text_folders[0]), "--eval-data", str(text_folders[1])]
    for seed in ("1", "2"):
        args = ["train", "--model", str(tiny_lm_folder), *TRAIN_SIZES, *data, "--seed", seed]
        assert main([*args, "--out", str(tmp_path / seed)]) == 0
    one, two = (SAE.load_from_disk(tmp_path / seed) for seed in ("1", "2"))
    assert not torch.equal(one.W_enc, two.W_enc)


def test_train_continue_optimizer_runs_the_a1_recipe(
    tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path
) -> None:
    data = ["--data", str(text_folders[0]), "--eval-data", str(text_folders[1])]
    args = ["train", "--model", str(tiny_lm_folder), *TRAIN_SIZES, *data, "--continue-optimizer"]
    assert main([*args, "--mse-lr", "3e-3", "--out", str(tmp_path / "a1")]) == 0
    config = json.loads((tmp_path / "a1" / "report.json").read_text())["runs"]["KL+MSE"]["config"]
    assert (config["lr"], config["lr_schedule"]) == (3e-3, "constant")
    assert config["continue_optimizer_from"] is not None


def test_train_has_no_tokens_flag_to_drop() -> None:
    # Its budget is --training-tokens; a --tokens flag would be accepted and ignored.
    with pytest.raises(SystemExit):
        main(["train", "--tokens", "1000"])


@pytest.mark.parametrize("name", list("ABCDEF"))
def test_each_experiment_at_a_tiny_size(
    name: str, tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path
) -> None:
    from sae_lens_kl.experiments import EXPERIMENTS

    train_text, eval_text = text_folders
    args = ["experiment", name, "--model", str(tiny_lm_folder), "--hook", "blocks.1.hook_resid_pre"]
    args += ["--d-sae", "64", "--k", "4", "--context-size", "32", "--mse-tokens", "2048", "--kl-steps", "2"]
    args += ["--eval-tokens", "256", "--data", str(train_text), "--eval-data", str(eval_text), "--quick"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "experiment.json").read_text())
    arms = EXPERIMENTS[name].arms
    assert [row["arm"] for row in result["arms"]] == [arm.name for arm in arms]
    assert (tmp_path / "out" / "experiment.png").is_file() and (tmp_path / "out" / "experiment.md").is_file()
    for arm, row in zip(arms, result["arms"], strict=True):
        (reports,) = result["reports"][arm.name]  # one seed
        assert len(reports) == len(arm.stages) and row["train_seconds"] > 0
        if arm.kl_fraction is None:  # every arm from the same MSE-phase SAE of its architecture
            share = len(arm.stages) if arm.split_budget else 1  # a two-stage arm splits the budget
            assert reports[0]["training_tokens"] == 2 * KL_BATCH_SEQUENCES * 32 // share
            # arms that change only the loss, to one that reads nothing after the hook, train from the
            # clean-pass cache of the KL tokens; the others (adapters, LoRA, e2e+ds) from the tokens
            for stage, report in zip(arm.stages, reports, strict=True):
                loss = stage.get("loss", "kl+mse")
                cached = set(stage) <= {"loss"} and not OBJECTIVES[loss].takes_downstream_hooks
                assert report["data"]["source"].startswith("CleanPassCache" if cached else "token tensor")
        if arm.one_optimizer:  # A.1: one constant lr; the KL phase continues the MSE phase's Adam
            config = reports[0]["config"]
            assert config["lr_schedule"] == "constant"
            assert (config["continue_optimizer_from"] is not None) == (arm.kl_fraction < 1)
        if row["fraction_of_ce_gap_closed"] is not None:  # (a tiny random model may have no gap)
            low, high = row["fraction_interval"]  # paired, on the shared held-out sequences
            assert low <= row["fraction_of_ce_gap_closed"] <= high
        else:
            assert row["ce_gap_before"] <= 0
    befores = {
        json.dumps(result["reports"][a.name][0][0]["before"])
        for a in arms
        if a.kl_fraction is None and a.start == "topk"
    }
    assert len(befores) <= 1


def test_an_experiment_over_seeds(tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path) -> None:
    train_text, eval_text = text_folders
    args = ["experiment", "C", "--model", str(tiny_lm_folder), "--hook", "blocks.1.hook_resid_pre"]
    args += ["--d-sae", "64", "--k", "4", "--context-size", "32", "--mse-tokens", "2048", "--kl-steps", "2"]
    args += ["--eval-tokens", "256", "--data", str(train_text), "--eval-data", str(eval_text), "--quick"]
    # more seeds than the training text has KL-phase blocks: refused before any training
    code = main([*args, "--seeds", "10000", "--out", str(tmp_path / "too_many")])
    assert code == 2 and not (tmp_path / "too_many").exists()
    assert main([*args, "--seeds", "2", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert result["settings"]["seeds"] == 2
    for row in result["arms"]:
        seeds = result["reports"][row["arm"]]
        assert len(seeds) == 2
        # seed s trained on the s-th block of KL-phase tokens, from init_seed s
        assert [stages[0]["config"]["init_seed"] for stages in seeds] == [0, 1]
        fractions = row["fraction_per_seed"]
        if None not in fractions:
            assert row["fraction_of_ce_gap_closed"] == pytest.approx(sum(fractions) / 2, rel=1e-12)
    for slug in ("full_fine_tune", "lora_on_the_sae_rank_2"):
        weights = [tmp_path / "out" / slug / f"seed_{s}" / "sae_weights.safetensors" for s in (0, 1)]
        assert weights[0].read_bytes() != weights[1].read_bytes()


def test_the_sweep_at_a_tiny_size(tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path) -> None:
    train_text, eval_text = text_folders
    args = ["sweep", "--model", str(tiny_lm_folder), "--hook", "blocks.1.hook_resid_pre", "--quick"]
    args += ["--d-sae", "64", "--k", "4", "--context-size", "32", "--mse-tokens", "2048"]
    args += ["--eval-tokens", "256", "--data", str(train_text), "--eval-data", str(eval_text)]
    cells = ["--lrs", "1e-3,1e-2", "--steps", "1,2", "--kl-batch", "4"]
    assert main([*args, *cells, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert result["settings"]["held_out_split"] == "validation"  # the default
    assert result["settings"]["batch"] == "4 x 32 tokens"
    assert [(c["lr"], c["steps"]) for c in result["cells"]] == [(1e-3, 1), (1e-3, 2), (1e-2, 1), (1e-2, 2)]
    for cell in result["cells"]:
        assert cell["kl_tokens"] == cell["steps"] * 4 * 32
        for arm in ("KL+MSE", "MSE-only"):
            assert cell[arm]["dead_latents"] >= 0 and cell[arm]["wall_seconds"] > 0
        closed = [cell[arm]["fraction_ce_gap_closed"] for arm in ("KL+MSE", "MSE-only")]
        assert cell["difference"] == (None if None in closed else closed[0] - closed[1])
        if cell["difference"] is not None:  # the table shows it beside its interval
            assert f"| {cell['difference']:+.1%} [" in (tmp_path / "out" / "sweep.md").read_text()
    assert (tmp_path / "out" / "sweep.md").is_file() and (tmp_path / "out" / "sweep.png").is_file()
    for bad in (["--lrs", "0"], ["--steps", "100000"]):  # a step count the text cannot hold
        code = main([*args, *bad, "--out", str(tmp_path / "bad")])
        assert code == 2 and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as usage_error:  # argparse's usage error, before any work
        main([*args, "--kl-batch", "0", "--out", str(tmp_path / "bad")])
    assert usage_error.value.code == 2 and not (tmp_path / "bad").exists()


def test_the_held_out_splits_alternate_over_the_whole_held_out_text(
    tiny_lm_folder: Path, text_folders: tuple[Path, Path]
) -> None:
    from sae_lens_kl.cli import build_parser
    from sae_lens_kl.commands.demo import demo_setup
    from sae_lens_kl.data import token_sequences

    train_text, eval_text = text_folders
    args = ["sweep", "--model", str(tiny_lm_folder), "--hook", "blocks.1.hook_resid_pre"]
    args += ["--context-size", "32", "--data", str(train_text), "--eval-data", str(eval_text)]
    held = {}
    for split in ("validation", "test"):
        setup = demo_setup(build_parser().parse_args([*args, "--eval-tokens", "128", "--eval-split", split]))
        held[split] = torch.cat(setup.evaluator.batches)
    every = torch.stack(list(token_sequences(eval_text, setup.model, 32, bool(setup.runner_cfg.prepend_bos))))
    assert len(every) > 8  # so that the 2 x 4 sequences are spread, not the first 8
    position = {tuple(sequence.tolist()): index for index, sequence in enumerate(every)}
    test, validation = (
        [position[tuple(s.tolist())] for s in held[split]] for split in ("test", "validation")
    )
    assert len(test) == len(validation) == 4 and not set(test) & set(validation)
    assert sorted(test + validation)[-1] >= len(every) * 3 // 4  # reaching the end of the text
    assert all(t < v for t, v in zip(test, validation, strict=True))  # alternating
    with pytest.raises(SystemExit, match="pass fewer --eval-tokens or more --eval-data"):
        demo_setup(build_parser().parse_args([*args, "--eval-tokens", "10000000"]))


def test_the_sparsity_sweep_at_a_tiny_size(
    tiny_lm_folder: Path, text_folders: tuple[Path, Path], tmp_path
) -> None:
    train_text, eval_text = text_folders
    args = ["sparsity", "--model", str(tiny_lm_folder), "--hook", "blocks.1.hook_resid_pre", "--quick"]
    args += ["--d-sae", "64", "--context-size", "32", "--mse-tokens", "2048", "--kl-share", "0.2"]
    args += ["--eval-tokens", "256", "--data", str(train_text), "--eval-data", str(eval_text)]
    assert main([*args, "--ks", "2,4", "--end-to-end", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    # 20 % of the run: 2048 * 0.2 / 0.8 = 512 tokens, whole batches of KL_BATCH_SEQUENCES x 32
    assert result["settings"]["kl_tokens"] == 512
    assert [row["k"] for row in result["rows"]] == [2, 4]
    for row in result["rows"]:
        assert set(row["arms"]) == {"KL+MSE", "MSE-only", "end to end"}
        assert row["seconds"]["end to end"] > 0
        for values in row["arms"].values():
            if values["fraction_ce_gap_closed"] is not None:
                low, high = values["interval"]
                assert low <= values["fraction_ce_gap_closed"] <= high
        # each k's own MSE-phase SAE, fine-tuned at its k
        cfg = json.loads((tmp_path / "out" / f"k{row['k']}" / "kl_mse" / "cfg.json").read_text())
        assert cfg["k"] == row["k"]
    assert (tmp_path / "out" / "sparsity.png").is_file() and (tmp_path / "out" / "sparsity.md").is_file()
    for bad in (["--ks", "0"], ["--ks", "65"], ["--kl-share", "1"]):
        code = main([*args, *bad, "--out", str(tmp_path / "bad")])
        assert code == 2 and not (tmp_path / "bad").exists()
