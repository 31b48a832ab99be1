"""SAEBench's own evals (sae-bench 0.6.0, the [saebench] extra) on our SAEs, side by side: the
table holds exactly what SAEBench wrote, identical SAEs score identically, a changed SAE scores
differently, the SAEs given are left as they were, and a failing eval leaves the finished ones."""

from __future__ import annotations

import copy
import json

import pandas
import pytest
import torch
from conftest import make_sae, sentences, tiny_text_model

from sae_lens_kl.saebench import INSTALL, OFFLINE_EVALS, RESULT_SUFFIX, SAEBenchError, evaluate_saebench

pytest.importorskip("sae_bench", reason=f"the [saebench] extra is not installed ({INSTALL})")

CORE = {"context_size": 16, "batch_size_prompts": 4, "n_eval_reconstruction_batches": 2}
CORE |= {"n_eval_sparsity_variance_batches": 2}
META = {"train_steps": 40, "train_batch_size": 32, "eval_batch_size": 64}


def tiny_saes(model_name: str, hook: str) -> dict:
    before = make_sae("standard", hook_name=hook, d_sae=96)
    before.cfg.metadata.model_name = model_name
    before.cfg.metadata.prepend_bos = True
    twin = copy.deepcopy(before)
    # the same function with decoder rows twice as long (powers of two scale exactly in floats)
    rescaled = copy.deepcopy(before)
    with torch.no_grad():
        rescaled.W_dec.mul_(2)
        rescaled.W_enc.div_(2)
        rescaled.b_enc.div_(2)
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.W_enc.mul_(1.5)
        after.W_dec.add_(0.05 * torch.randn_like(after.W_dec))
    return {"before": before, "twin": twin, "rescaled": rescaled, "after": after}


def test_core_and_meta_structure_side_by_side(tmp_path) -> None:
    model = tiny_text_model()
    saes = tiny_saes("tiny-text-model", "blocks.1.hook_resid_pre")
    weights = {name: {k: v.clone() for k, v in sae.state_dict().items()} for name, sae in saes.items()}
    cfg_keys = {name: set(vars(sae.cfg)) for name, sae in saes.items()}

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    table = evaluate_saebench(
        saes,
        model,
        ["core", "meta_structure"],
        tmp_path,
        data=sentences(60),
        configs={"core": CORE, "meta_structure": META},
    )

    for eval_name in ("core", "meta_structure"):
        for name in saes:
            written = json.loads((tmp_path / eval_name / f"{name}{RESULT_SUFFIX}").read_text())
            for headline in OFFLINE_EVALS[eval_name].headlines:
                value = written["eval_result_metrics"].get(headline.category, {}).get(headline.metric)
                if value is not None:
                    assert table["evals"][eval_name][headline.label][name] == value
    core = table["evals"]["core"]
    assert core["reconstruction_quality.explained_variance"]["before"] < 1
    # the same SAE under two names scores the same, and so does its rescaled form, as SAEBench
    # gets both with unit decoder rows; the changed one scores differently
    for label, row in core.items():
        assert row["twin"] == row["before"] == row["rescaled"], label
    for label in ("reconstruction_quality.mse", "model_behavior_preservation.kl_div_score", "sparsity.l1"):
        assert core[label]["after"] != core[label]["before"], label
    meta = table["evals"]["meta_structure"]["meta_structure.decoder_fraction_variance_explained"]
    assert meta["after"] != meta["before"]
    # seeded: SAEBench's meta-SAE draws from torch's RNG
    assert meta["twin"] == meta["before"] == meta["rescaled"]

    assert torch.equal(torch.rand(3), expected)  # the caller's generator state came back
    saved = json.loads((tmp_path / "saebench.json").read_text())
    assert saved["evals"] == table["evals"] and saved["saes"] == ["before", "twin", "rescaled", "after"]
    markdown = (tmp_path / "saebench.md").read_text()
    assert "| core | reconstruction_quality.mse ↓ |" in markdown and "after − before" in markdown
    assert (tmp_path / "saebench.png").stat().st_size > 10_000
    for name, sae in saes.items():  # SAEBench got copies: the SAEs given are as they were
        assert set(vars(sae.cfg)) == cfg_keys[name]
        for key, value in sae.state_dict().items():
            assert torch.equal(value, weights[name][key])


def test_a_failing_eval_leaves_the_finished_ones_on_disk(tmp_path) -> None:
    model = tiny_text_model()
    saes = tiny_saes("tiny-text-model", "blocks.1.hook_resid_post")
    saes = {"before": saes["before"], "after": saes["after"]}
    suffix = len(model.tokenizer(" has the first letter:", add_special_tokens=False)["input_ids"])
    # The tiny BPE vocabulary spells few first letters: SAEBench's absorption cannot finish on it.
    with pytest.raises(Exception):  # noqa: B017 (whatever SAEBench raises mid-way)
        evaluate_saebench(
            saes,
            model,
            ["meta_structure", "absorption"],
            tmp_path,
            configs={"meta_structure": META, "absorption": {"prompt_token_pos": -(suffix + 1)}},
        )
    saved = json.loads((tmp_path / "saebench.json").read_text())
    assert list(saved["evals"]) == ["meta_structure"]
    assert (tmp_path / "meta_structure" / f"before{RESULT_SUFFIX}").is_file()
    assert "meta_structure" in (tmp_path / "saebench.md").read_text()


def test_absorption_on_the_real_model(tmp_path) -> None:
    """Absorption's first-letter tasks from SmolLM2's vocabulary (a 400-word sample, thresholds
    lowered so a 135M model at this quick size gets through SAEBench's gate)."""
    from sae_lens_kl.models import load_model

    model = load_model()
    hook = "blocks.6.hook_resid_post"
    before = make_sae("topk", hook_name=hook, d_in=576, d_sae=1024, k=32)
    before.cfg.metadata.model_name = model.cfg.model_name
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.W_enc.mul_(-1)  # other latents fire on every word
    table = evaluate_saebench(
        {"before": before, "after": after},
        model,
        ["absorption"],
        tmp_path,
        absorption_words=400,
        configs={
            "absorption": {
                "min_GT_probe_f1": 0.3,
                "min_feats_for_eval": 3,
                "k_sparse_probe_num_epochs": 5,
                "llm_batch_size": 32,
            }
        },
    )
    assert torch.is_grad_enabled()  # the caller's grad mode came back
    rows = table["evals"]["absorption"]
    fractions = rows["mean.mean_absorption_fraction_score"]
    assert all(0 <= value <= 1 for value in fractions.values())
    assert rows["mean.mean_num_split_features"]["before"] >= 1
    assert any(rows[label]["before"] != rows[label]["after"] for label in rows)
    # SAEBench's own spread: its standard deviation over letters / sqrt(letters), shown as ±
    written = json.loads((tmp_path / "absorption" / f"before{RESULT_SUFFIX}").read_text())
    letters = len(written["eval_result_details"])
    deviation = written["eval_result_metrics"]["mean"]["std_dev_absorption_fraction_score"]
    error = table["standard_errors"]["absorption"]["mean.mean_absorption_fraction_score"]["before"]
    assert letters >= 2 and error == deviation / letters**0.5
    assert f"± {error:.2g}" in (tmp_path / "saebench.md").read_text()
    # SAEBench's probe was trained and tested on the sampled words only
    # keyed by the eval's settings: another run with other settings cannot read these probes
    (settings_folder,) = (tmp_path / "absorption" / "artifacts").iterdir()
    probes = settings_folder / "probes" / model.cfg.model_name / "layer_6"
    words = sum(len(pandas.read_csv(probes / f"{split}_df.csv")) for split in ("train", "test"))
    assert 400 <= words <= 400 + 26 * 12
    assert table["settings"]["absorption"]["vocabulary_words"] == 400


def test_a_fine_tune_folder_brings_its_starting_sae(tmp_path) -> None:
    """kl_finetune records where its SAE came from; `saebench --sae after=FOLDER` compares with it."""
    from conftest import random_tokens, tiny_model

    from sae_lens_kl import kl_finetune
    from sae_lens_kl.cli import main

    start = make_sae("topk")
    start.save_model(tmp_path / "start")
    kl_finetune(
        start,
        tiny_model(),
        random_tokens(48),
        tokens=4 * 4 * 16,
        lr=1e-2,
        batch_size=4,
        eval_tokens=8 * 16,
        save_dir=tmp_path / "tuned",
        start_sae=tmp_path / "start",
    )
    metrics = json.loads((tmp_path / "tuned" / "kl_finetune_metrics.json").read_text())
    assert metrics["start_sae"] == str((tmp_path / "start").resolve())
    config = json.dumps({"meta_structure": META})
    argv = ["saebench", "--sae", f"after={tmp_path / 'tuned'}", "--evals", "meta_structure"]
    assert main([*argv, "--eval-config", config, "--out", str(tmp_path / "bench")]) == 0
    table = json.loads((tmp_path / "bench" / "saebench.json").read_text())
    assert table["saes"] == ["before", "after"]
    row = table["evals"]["meta_structure"]["meta_structure.final_reconstruction_mse"]
    assert row["before"] != row["after"]


def test_quick_results_are_marked_as_such(tmp_path) -> None:
    saes = tiny_saes("tiny-text-model", "blocks.1.hook_resid_post")
    saes = {"before": saes["before"], "after": saes["after"]}
    table = evaluate_saebench(
        saes, tiny_text_model(), ["meta_structure"], tmp_path, quick=True, configs={"meta_structure": META}
    )
    assert table["quick"] is True and json.loads((tmp_path / "saebench.json").read_text())["quick"] is True
    assert (
        "(--quick: a smoke test, not a measurement)" in (tmp_path / "saebench.md").read_text().splitlines()[0]
    )


def test_core_equals_saebenchs_own_multiple_evals(tmp_path) -> None:
    """Our core run (the model and text given, nothing by name) against SAEBench's multiple_evals
    (its model loader served our model) on the same local text: the same numbers. Both call
    SAEBench's run_evals, so what this checks is the setup around it: the activation store, token
    order, special tokens, decoder fold and config."""
    import datasets
    from sae_bench.evals.core import main

    from sae_lens_kl.saebench.sae_bench_0_6_0 import serving

    model = tiny_text_model()
    sae = tiny_saes(model.cfg.model_name, "blocks.1.hook_resid_pre")["before"]
    # unit decoder rows (SAEBench folds the norms only of SAEs it loads by name; ours folds a copy)
    sae.fold_W_dec_norm()
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in sentences(60)))
    sizes = {"context_size": 16, "n_eval_reconstruction_batches": 2, "n_eval_sparsity_variance_batches": 2}
    with serving(model, main):
        main.multiple_evals(
            [("before", copy.deepcopy(sae))],
            eval_batch_size_prompts=4,
            compute_featurewise_density_statistics=True,
            compute_featurewise_weight_based_metrics=True,
            exclude_special_tokens_from_reconstruction=True,  # as its runner for custom SAEs
            dataset=str(folder),
            output_folder=str(tmp_path / "theirs"),
            device="cpu",
            force_rerun=True,
            **sizes,
        )
    (theirs_file,) = (tmp_path / "theirs").glob("*.json")
    text = datasets.load_dataset(str(folder), split="train", streaming=True)
    evaluate_saebench(
        {"before": sae},
        model,
        ["core"],
        tmp_path / "ours",
        data=text,
        configs={"core": {**sizes, "batch_size_prompts": 4}},
    )
    theirs = json.loads(theirs_file.read_text())["eval_result_metrics"]
    ours = json.loads((tmp_path / "ours" / "core" / f"before{RESULT_SUFFIX}").read_text())[
        "eval_result_metrics"
    ]
    assert ours.keys() == theirs.keys()
    for category, metrics in theirs.items():
        assert ours[category].keys() == metrics.keys(), category
        for metric, value in metrics.items():
            # the fold divides rows of norm 1 (to float32 rounding) by their norms: a few ulp
            # (2^-23 relative) per weight, summed through the eval's float32 reductions
            assert ours[category][metric] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{category}.{metric}"


def test_core_refuses_a_dataset_label_other_than_the_text_it_evaluates(tmp_path) -> None:
    # SAEBench's result file records core's `dataset` as the text evaluated, which is `data`
    sae = make_sae("standard")
    model = tiny_text_model()
    sae.cfg.metadata.model_name = model.cfg.model_name
    with pytest.raises(SAEBenchError, match="would be recorded as the text evaluated"):
        evaluate_saebench(
            {"before": sae},
            model,
            ["core"],
            tmp_path / "out",
            data=sentences(10),
            configs={"core": {"dataset": "Skylion007/openwebtext"}},
        )
    assert not (tmp_path / "out").exists()
