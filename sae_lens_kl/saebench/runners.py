"""Running SAEBench's evals on several SAEs: `evaluate_saebench` and one runner per eval."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_lens_kl.data import DataSource, describe
from sae_lens_kl.saebench.checks import (
    check_absorption,
    check_configs,
    check_evals,
    check_names,
    check_out,
    check_saes,
    check_width,
    core_dataset,
)
from sae_lens_kl.saebench.report import read_headlines, read_standard_errors, write_table
from sae_lens_kl.saebench.sae_bench_0_6_0 import (
    caller_rng_kept,
    defaults_replaced,
    saebench_copy,
    seed_everything,
    serving,
    vocabulary_sample,
    working_directory,
)
from sae_lens_kl.saebench.specs import (
    OFFLINE_EVALS,
    QUICK,
    QUICK_ABSORPTION_WORDS,
    RESULT_SUFFIX,
    SAEBenchError,
    package_version,
    sae_bench_module,
)


def evaluate_saebench(
    saes: Mapping[str, SAE[Any]],
    model: HookedTransformer | None,
    evals: Sequence[str] = ("core", "absorption", "meta_structure"),
    out_dir: str | os.PathLike[str] = "saebench",
    *,
    data: DataSource | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    absorption_words: int | None = None,
    quick: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Run SAEBench's evals on every SAE and tabulate their headline numbers.

    `saes` maps a column name to an SAE (e.g. {"before": sae, "after": kl_finetune(sae, ...)}); all
    at one hook of `model`. `data` is core's text (a local file or folder, a list of strings, a
    datasets.Dataset or a hub name). `configs` overrides fields of an eval's SAEBench config, e.g.
    {"core": {"n_eval_reconstruction_batches": 20}}. `absorption_words` evaluates absorption on a
    seeded random subset of that many of the tokenizer's alphabetic tokens (SAEBench uses all of
    them: ~30k for a 50k vocabulary, hours on a CPU). `quick` applies the small sizes of `QUICK`.

    Writes out_dir/<eval>/ (SAEBench's own result files), saebench.json, saebench.md and
    saebench.png, rewritten after each eval so a later failure leaves the finished ones. Returns
    the table ({"evals": {eval: {metric: {sae: value}}}, ...}). SAEBench gets copies with the
    decoder norms folded into the encoder (`saebench_copy`); the SAEs given are not modified.
    """
    evals = check_evals(evals)
    check_names(saes)
    out = check_out(out_dir)
    overrides = {name: dict(QUICK.get(name, {})) if quick else {} for name in evals}
    for name, given in (configs or {}).items():
        overrides.setdefault(name, {}).update(given)
    check_configs(evals, {k: v for k, v in overrides.items() if v})
    if absorption_words is None and quick:
        absorption_words = QUICK_ABSORPTION_WORDS
    if absorption_words is not None and absorption_words < 52:
        raise SAEBenchError(f"absorption_words={absorption_words}: take at least 52 (two per letter).")
    if any(OFFLINE_EVALS[name].needs_model for name in evals) and model is None:
        raise SAEBenchError(f"Evals {evals} need the model; pass it.")
    hook = check_saes(saes, None if model is None else model.cfg.model_name)
    if model is not None:
        check_width(saes, model, hook)
    if "absorption" in evals:
        assert model is not None
        check_absorption(model, hook, overrides["absorption"])
    core_data = None
    if "core" in evals:
        if data is None:
            raise SAEBenchError(
                "core needs text to evaluate on: pass data= (a local folder, texts, a dataset)."
            )
        core_data = core_dataset(data)
        # SAEBench's result file records this as the text evaluated, which is `data`
        label = describe(data)
        if overrides["core"].setdefault("dataset", label) != label:
            raise SAEBenchError(
                f"core's dataset option {overrides['core']['dataset']!r} would be recorded as the text "
                f"evaluated, but core evaluates data= ({label}); pass that text as data instead."
            )
    sae_bench_module("sae_bench.evals.core.main")  # the extra is installed
    device = device or (str(next(iter(saes.values())).W_dec.device) if model is None else model.cfg.device)

    table: dict[str, Any] = {
        "quick": quick,
        "saes": list(saes),
        "hook_name": hook,
        "model_name": None if model is None else model.cfg.model_name,
        "evals": {},
        "settings": {},
        "wall_seconds": {},
        # SAEBench's own spread where it reports one (absorption, over letters); core and
        # meta_structure report means only
        "standard_errors": {},
        "sae_bench_version": package_version("sae-bench"),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name in evals:
        started = time.perf_counter()
        eval_dir = out / name
        run = {"core": _run_core, "absorption": _run_absorption, "meta_structure": _run_meta_structure}[name]
        with caller_rng_kept():
            settings = run(
                {sae_name: saebench_copy(sae) for sae_name, sae in saes.items()},
                model,
                eval_dir,
                overrides[name],
                device=str(device),
                data=core_data,
                absorption_words=absorption_words,
            )
        table["settings"][name] = settings
        table["wall_seconds"][name] = time.perf_counter() - started
        table["evals"][name] = read_headlines(OFFLINE_EVALS[name], eval_dir, list(saes))
        table["standard_errors"][name] = read_standard_errors(OFFLINE_EVALS[name], eval_dir, list(saes))
        write_table(table, out)
    return table


def _run_absorption(
    saes: dict[str, SAE[Any]],
    model: HookedTransformer | None,
    eval_dir: Path,
    overrides: dict[str, Any],
    *,
    device: str,
    absorption_words: int | None,
    **_: Any,
) -> dict[str, Any]:
    main = sae_bench_module("sae_bench.evals.absorption.main")
    from sae_bench.evals.absorption import feature_absorption, k_sparse_probing

    assert model is not None
    config = main.AbsorptionEvalConfig(
        model_name=model.cfg.model_name, llm_dtype=str(model.cfg.dtype).removeprefix("torch."), **overrides
    )
    served = (
        model if absorption_words is None else vocabulary_sample(model, absorption_words, config.random_seed)
    )
    # probes and caches depend on every setting: a run with other settings gets its own folder
    settings_key = hashlib.sha256(
        json.dumps(
            {**config.__dict__, "vocabulary_words": absorption_words}, sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:12]
    work = (eval_dir / "artifacts" / settings_key).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # sae-bench 0.6.0's absorption draws from the global generators without seeding them
    seed_everything(config.random_seed)
    # sae-bench 0.6.0 keeps absorption's probes and per-SAE caches in its installed package folder
    # (shared by every run, keyed only by model and SAE name) and more under ./artifacts: this run's
    # go in its own folder, and force_rerun keeps a previous run's SAE of the same name from being read.
    with (
        serving(served, main),
        working_directory(work),
        defaults_replaced(
            k_sparse_probing.run_k_sparse_probing_experiment,
            experiment_dir=work / "k_sparse_probing",
            probes_dir=work / "probes",
        ),
        defaults_replaced(
            feature_absorption.run_feature_absortion_experiment,
            experiment_dir=work / "feature_absorption",
            sparse_probing_experiment_dir=work / "k_sparse_probing",
            probes_dir=work / "probes",
        ),
    ):
        main.run_eval(config, list(saes.items()), device, str(eval_dir.resolve()), force_rerun=True)
    missing = [name for name in saes if not (eval_dir / f"{name}{RESULT_SUFFIX}").is_file()]
    if missing:
        raise RuntimeError(
            f"absorption wrote no result for {missing}: SAEBench found fewer than "
            f"min_feats_for_eval={config.min_feats_for_eval} first letters whose probe reaches F1 > "
            f"{config.min_GT_probe_f1} in {model.cfg.model_name} "
            f"(its per-letter F1s: {work}/k_sparse_probing). Use more words or a later layer."
        )
    settings = dict(config.__dict__)
    settings["vocabulary_words"] = absorption_words
    return settings


def _run_meta_structure(
    saes: dict[str, SAE[Any]],
    model: HookedTransformer | None,  # noqa: ARG001 (decoder-only eval)
    eval_dir: Path,
    overrides: dict[str, Any],
    *,
    device: str,
    **_: Any,
) -> dict[str, Any]:
    main = sae_bench_module("sae_bench.evals.meta_structure.main")
    config = main.MetaStructureEvalConfig(**overrides)
    for name, sae in saes.items():
        # SAEBench's meta-SAE is initialised and fed from torch's RNG: the same draws for every SAE
        seed_everything(config.random_seed)
        main.run_eval(config, [(name, sae)], device, str(eval_dir.resolve()), force_rerun=True)
    return dict(config.__dict__)


def _run_core(
    saes: dict[str, SAE[Any]],
    model: HookedTransformer | None,
    eval_dir: Path,
    overrides: dict[str, Any],
    *,
    device: str,
    data: Any,
    **_: Any,
) -> dict[str, Any]:
    """SAEBench core's per-SAE evaluation (run_evals and its result file), as its multiple_evals
    does it but with the model and dataset given: multiple_evals loads the model by name and
    logs and skips an SAE whose evaluation fails, where this raises."""
    main = sae_bench_module("sae_bench.evals.core.main")
    from sae_bench.sae_bench_utils import (
        general_utils,
        get_eval_uuid,
        get_sae_bench_version,
        get_sae_lens_version,
    )
    from sae_lens.training.activations_store import ActivationsStore

    assert model is not None
    config = main.CoreEvalConfig(
        **{
            "model_name": model.cfg.model_name,
            "llm_dtype": str(model.cfg.dtype).removeprefix("torch."),
            "compute_kl": True,
            "compute_ce_loss": True,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True,
            # as SAEBench's runner for custom SAEs (custom_saes/run_all_evals_custom_saes.py)
            "exclude_special_tokens_from_reconstruction": True,
            **overrides,
        }
    )
    eval_dir.mkdir(parents=True, exist_ok=True)
    eval_id = get_eval_uuid()
    tokenizer = model.tokenizer
    ignore = (
        set()
        if tokenizer is None
        else {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    )
    for name, sae in saes.items():
        sae_id, sae, _ = general_utils.load_and_format_sae(name, sae, device)
        store = ActivationsStore.from_sae(
            model,
            sae,
            dataset=data,
            context_size=config.context_size,
            device=device,
            streaming=isinstance(data, str),
        )
        store.shuffle_input_dataset(seed=42)  # as multiple_evals
        metrics, feature_metrics = main.run_evals(
            sae=sae, activation_store=store, model=model, eval_config=config, ignore_tokens=ignore
        )
        result: dict[str, Any] = {"sae_set": name, "sae_id": sae_id, "eval_cfg": config, "metrics": metrics}
        if config.compute_featurewise_density_statistics or config.compute_featurewise_weight_based_metrics:
            result["metrics"]["misc_metrics"] = main.calculate_misc_metrics(feature_metrics)
            result["feature_metrics"] = feature_metrics
        main.save_single_eval_result(
            main.replace_nans_with_negative_one(result),
            eval_id,
            get_sae_lens_version(),
            get_sae_bench_version(),
            general_utils.get_results_filepath(str(eval_dir), name, sae_id),
            sae,
        )
    return {key: value for key, value in config.__dict__.items()}
