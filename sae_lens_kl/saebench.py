"""SAEBench before and after: SAEBench's own evals (sae-bench 0.6.0) on several SAEs of one model,
their headline numbers in one table (JSON + Markdown, one column per SAE and the difference from
the first) and a paired bar chart, SAEBench's full result files kept beside them.

Runs here, offline: core (reconstruction, CE/KL preservation, sparsity, on a text dataset you
give), absorption (first-letter tasks from the tokenizer's vocabulary) and meta_structure (the
decoder alone). The others need hub datasets or an API key and are refused before any work.

sae-bench is an optional extra (it pins numpy<2 and datasets<4): see `INSTALL`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_lens_kl.data import DataSource, _local_files, describe, documents
from sae_lens_kl.staging import staged_files, write_file

INSTALL = 'pip install "sae-lens-kl[saebench]" && pip install --no-deps sae-bench==0.6.0'
"""sae-bench's own dependencies come with the extra; sae-bench itself without them, because it
also requires torchvision, which it never imports and which would replace a CPU torch with the
newest CUDA build."""

RESULT_SUFFIX = "_custom_sae_eval_results.json"  # SAEBench names an SAE object's results so

# eval -> what it needs that this machine may not have; named in the error before any work
NEEDS_HUB: dict[str, str] = {
    "sparse_probing": "the Hugging Face hub datasets LabHC/bias_in_bios_class_set1-3, "
    "canrager/amazon_reviews_mcauley_1and5(_sentiment), codeparrot/github-code, fancyzhx/ag_news, "
    "Helsinki-NLP/europarl",
    "scr": "the Hugging Face hub datasets LabHC/bias_in_bios_class_set1 and "
    "canrager/amazon_reviews_mcauley_1and5",
    "tpp": "the Hugging Face hub datasets LabHC/bias_in_bios_class_set1 and "
    "canrager/amazon_reviews_mcauley_1and5",
    "ravel": "the Hugging Face hub dataset adamkarvonen/ravel_prompts and the model's Hugging Face "
    "checkpoint by name (it runs transformers' AutoModelForCausalLM)",
    "autointerp": "an OpenAI API key (in openai_api_key.txt) and the Hugging Face hub dataset "
    "monology/pile-uncopyrighted",
    "unlearning": "the WMDP bio-forget-corpus (gated; requested from its authors) and the hub "
    "datasets cais/wmdp, cais/mmlu and wikitext",
    "sparse_probing_sae_probes": "the sae-probes datasets from the Hugging Face hub",
    "mdl": "the Hugging Face hub dataset HuggingFaceFW/fineweb",
}


@dataclass(frozen=True)
class Headline:
    """One number of an eval's result file shown in the table: its path under
    eval_result_metrics, and which way is better (+1 higher, -1 lower, 0 neither)."""

    category: str
    metric: str
    better: int
    spread: str | None = None
    """The metric (same category) holding SAEBench's standard deviation of this mean over its
    units (absorption: letters); the table shows its standard error."""

    @property
    def label(self) -> str:
        return f"{self.category}.{self.metric}"


@dataclass(frozen=True)
class OfflineEval:
    config_module: str
    config_class: str
    headlines: tuple[Headline, ...]
    needs_model: bool


OFFLINE_EVALS: dict[str, OfflineEval] = {
    "core": OfflineEval(
        "sae_bench.evals.core.eval_config",
        "CoreEvalConfig",
        (
            Headline("model_behavior_preservation", "kl_div_score", 1),
            Headline("model_performance_preservation", "ce_loss_score", 1),
            Headline("model_performance_preservation", "ce_loss_with_sae", -1),
            Headline("model_performance_preservation", "ce_loss_without_sae", 0),
            Headline("reconstruction_quality", "explained_variance", 1),
            Headline("reconstruction_quality", "mse", -1),
            Headline("reconstruction_quality", "cossim", 1),
            Headline("shrinkage", "l2_ratio", 0),
            Headline("sparsity", "l0", 0),
            Headline("sparsity", "l1", 0),
            Headline("misc_metrics", "frac_alive", 1),
        ),
        needs_model=True,
    ),
    "absorption": OfflineEval(
        "sae_bench.evals.absorption.eval_config",
        "AbsorptionEvalConfig",
        (
            Headline("mean", "mean_absorption_fraction_score", -1, "std_dev_absorption_fraction_score"),
            Headline("mean", "mean_full_absorption_score", -1, "std_dev_full_absorption_score"),
            Headline("mean", "mean_num_split_features", -1, "std_dev_num_split_features"),
        ),
        needs_model=True,
    ),
    "meta_structure": OfflineEval(
        "sae_bench.evals.meta_structure.eval_config",
        "MetaStructureEvalConfig",
        (
            Headline("meta_structure", "decoder_fraction_variance_explained", 0),
            Headline("meta_structure", "final_reconstruction_mse", 0),
        ),
        needs_model=False,
    ),
}
KNOWN_EVALS = (*OFFLINE_EVALS, *NEEDS_HUB)

# `quick`: a smoke test of a few minutes per eval on a 2-core CPU with SmolLM2-135M, not a measurement.
# On a 600-word sample SAEBench's absorption gate (20 letters with probe F1 > 0.6) is not reached
# (9 letters at SmolLM2 blocks.15): the quick size lowers it so the eval runs through.
QUICK: dict[str, dict[str, Any]] = {
    "core": {
        "n_eval_reconstruction_batches": 2,
        "n_eval_sparsity_variance_batches": 2,
        "batch_size_prompts": 8,
    },
    "absorption": {"k_sparse_probe_num_epochs": 10, "min_feats_for_eval": 5, "min_GT_probe_f1": 0.3},
    "meta_structure": {"train_steps": 100, "train_batch_size": 256},
}
QUICK_ABSORPTION_WORDS = 600
MIN_WORDS_PER_LETTER = 12  # SAEBench splits words 80/20 at random; each letter needs training words


class SAEBenchError(ValueError):
    """Input SAEBench cannot run on; raised before any eval starts."""


def sae_bench_module(name: str) -> Any:
    """A sae_bench module, or one error naming the install line when the extra is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise SAEBenchError(
            f"SAEBench is not installed ({error}). Install the optional extra: {INSTALL}"
        ) from error


def check_evals(evals: Sequence[str]) -> list[str]:
    """The evals asked for, in order; unknown or hub-only names are refused with what they need."""
    evals = list(evals)
    if not evals:
        raise SAEBenchError(f"No evals given; choose from {', '.join(OFFLINE_EVALS)}.")
    unknown = [name for name in evals if name not in KNOWN_EVALS]
    if unknown:
        raise SAEBenchError(f"Unknown eval {', '.join(unknown)}; known evals: {', '.join(KNOWN_EVALS)}.")
    for name in evals:
        if name in NEEDS_HUB:
            raise SAEBenchError(
                f"Eval {name} needs {NEEDS_HUB[name]}, which this package cannot fetch or check "
                f"offline, so it does not run it; run SAEBench's own `python -m sae_bench.evals."
                f"{'scr_and_tpp' if name in ('scr', 'tpp') else name}.main` where those are "
                f"available. Offline evals: {', '.join(OFFLINE_EVALS)}."
            )
    if len(set(evals)) != len(evals):
        raise SAEBenchError(f"An eval is named twice in {evals}.")
    return evals


def check_names(saes: Mapping[str, Any]) -> None:
    if not saes:
        raise SAEBenchError("No SAEs given: pass {'before': sae, 'after': tuned, ...}.")
    for name in saes:
        if not name or any(c in name for c in "/\\=:") or name.startswith("."):
            raise SAEBenchError(
                f"SAE name {name!r} cannot name result files; use letters, digits, '-', '_' (e.g. before)."
            )


def check_out(out_dir: str | os.PathLike[str]) -> Path:
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise SAEBenchError(f"Output folder {path} is a file; pass a folder.")
    return path


def check_saes(saes: Mapping[str, SAE[Any]], model_name: str | None) -> str:
    """All SAEs read the same hook of the same model; returns that hook."""
    hooks = {name: sae.cfg.metadata.hook_name for name, sae in saes.items()}
    if len(set(hooks.values())) != 1:
        raise SAEBenchError(
            f"The SAEs read different hooks ({hooks}); SAEBench before/after compares SAEs at one hook."
        )
    for name, sae in saes.items():
        sae_model = sae.cfg.metadata.model_name
        if model_name is not None and sae_model is not None and not same_model(sae_model, model_name):
            raise SAEBenchError(
                f"SAE {name!r} was trained on model {sae_model!r}, not {model_name!r}; pass its model."
            )
    hook = next(iter(hooks.values()))
    if hook is None:
        raise SAEBenchError("The SAEs' metadata name no hook (cfg.metadata.hook_name); set it.")
    return hook


def check_width(saes: Mapping[str, SAE[Any]], model: HookedTransformer, hook: str) -> None:
    """The SAEs read activations as wide as the model's at their hook (one token's forward)."""
    if hook not in model.hook_dict:
        raise SAEBenchError(f"The model has no hook {hook!r}; the SAEs belong to another model.")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device), names_filter=[hook]
        )
    shape = cache[hook].shape
    for name, sae in saes.items():
        width = shape[-1] if sae.cfg.metadata.hook_head_index is not None else math.prod(shape[2:])
        if sae.cfg.d_in != width:
            raise SAEBenchError(
                f"SAE {name!r} reads {sae.cfg.d_in} dimensions; {model.cfg.model_name} has {width} at "
                f"{hook}: it belongs to another model."
            )


def same_model(a: str, b: str) -> bool:
    """Whether two model names are one model, through TransformerLens's aliases (gpt2-small = gpt2)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    def official(name: str) -> str:
        try:
            return get_official_model_name(name).lower()
        except ValueError:  # not an official TransformerLens name (local models)
            return name.lower()

    return official(a) == official(b)


def check_configs(evals: Sequence[str], configs: Mapping[str, Mapping[str, Any]]) -> None:
    """Each override names a field of that eval's SAEBench config class."""
    for name, overrides in configs.items():
        if name not in evals:
            raise SAEBenchError(
                f"Settings given for eval {name!r}, which is not among the evals {list(evals)}."
            )
        spec = OFFLINE_EVALS[name]
        config_class = getattr(sae_bench_module(spec.config_module), spec.config_class)
        known = set(inspect.signature(config_class).parameters)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SAEBenchError(f"{spec.config_class} has no field {unknown}; its fields: {sorted(known)}.")


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
        "sae_bench_version": _version("sae-bench"),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name in evals:
        started = time.perf_counter()
        eval_dir = out / name
        run = {"core": _run_core, "absorption": _run_absorption, "meta_structure": _run_meta_structure}[name]
        with _caller_rng_kept():
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


def saebench_copy(sae: SAE[Any]) -> SAE[Any]:
    """A copy of `sae` with unit-norm decoder rows where SAELens can fold the norms into the
    encoder without changing what the SAE computes, as SAEBench does to every SAE it loads from
    the hub (its decoder-based metrics assume unit rows) but not to an SAE object. Without it, an
    SAE saved in training form (decoder norms unfolded) and its fine-tuned inference form would
    differ in every weight-based number for no reason. A copy, because SAEBench edits the config
    of the SAE it evaluates."""
    evaluated = copy.deepcopy(sae)
    with contextlib.suppress(NotImplementedError):  # e.g. TopK without rescale_acts_by_decoder_norm
        evaluated.fold_W_dec_norm()
    return evaluated


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_absorption(model: HookedTransformer, hook: str, overrides: Mapping[str, Any]) -> None:
    """SAEBench trains its first-letter probes at blocks.L.hook_resid_post and reads the word at a
    fixed position before the prompt's end: refuse what would silently compare the wrong things."""
    parts = hook.split(".")
    if not (
        len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == "hook_resid_post"
    ):
        raise SAEBenchError(
            f"absorption needs SAEs at blocks.L.hook_resid_post (SAEBench trains its probes there); "
            f"these read {hook}. Leave absorption out of the evals."
        )
    if model.tokenizer is None:
        raise SAEBenchError(
            "absorption builds its tasks from the tokenizer's vocabulary; the model has none."
        )
    config_module = sae_bench_module("sae_bench.evals.absorption.eval_config")
    defaults = config_module.AbsorptionEvalConfig()
    template = overrides.get("prompt_template", defaults.prompt_template)
    position = overrides.get("prompt_token_pos", defaults.prompt_token_pos)
    suffix = template.split("{word}", 1)[1]
    suffix_tokens = len(model.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if position != -(suffix_tokens + 1):
        raise SAEBenchError(
            f"absorption reads the word at position {position}, but this tokenizer splits the prompt's "
            f"end {suffix!r} into {suffix_tokens} tokens, so the word is at {-(suffix_tokens + 1)}: pass "
            f"configs={{'absorption': {{'prompt_token_pos': {-(suffix_tokens + 1)}}}}}."
        )


def core_dataset(data: DataSource) -> Any:
    """core's text as a datasets.Dataset (SAELens's ActivationsStore reads it), or a hub name."""
    import datasets

    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        return data
    if isinstance(data, str) and _local_files(data) is None:
        return data  # a hub dataset name: SAELens loads it
    texts = list(documents(data))
    if not texts:
        raise SAEBenchError(f"core's data {data!r} holds no text.")
    if isinstance(texts[0], torch.Tensor):
        return datasets.Dataset.from_dict({"input_ids": [t.tolist() for t in texts]})
    return datasets.Dataset.from_dict({"text": texts})


def _seed_everything(seed: int) -> None:
    import numpy

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """The evals seed Python's, numpy's and torch's generators and switch grad mode off; the
    caller's generator states and grad mode come back."""
    import numpy

    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    grad_enabled = torch.is_grad_enabled()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)
            torch.set_grad_enabled(grad_enabled)


@contextlib.contextmanager
def _serving(model: HookedTransformer, module: Any) -> Iterator[None]:
    """sae-bench 0.6.0 loads its model by name inside run_eval
    (HookedTransformer.from_pretrained_no_processing), which TransformerLens cannot do for a local
    or unofficial model: for the call, the module's HookedTransformer answers with `model`."""

    class Served:
        @staticmethod
        def from_pretrained_no_processing(name: str, **_: Any) -> HookedTransformer:
            if not same_model(name, model.cfg.model_name):
                raise SAEBenchError(
                    f"SAEBench asked for model {name!r}; this run serves {model.cfg.model_name!r}."
                )
            return model

    original = module.HookedTransformer
    module.HookedTransformer = Served
    try:
        yield
    finally:
        module.HookedTransformer = original


@contextlib.contextmanager
def _defaults(function: Callable[..., Any], **values: Any) -> Iterator[None]:
    """For the call, `function`'s keyword defaults named in `values` are replaced."""
    saved = function.__defaults__
    parameters = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    function.__defaults__ = tuple(values.get(p.name, p.default) for p in parameters)
    try:
        yield
    finally:
        function.__defaults__ = saved


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _vocabulary_sample(model: HookedTransformer, words: int, seed: int) -> HookedTransformer:
    """A view of `model` whose tokenizer lists only about `words` of its alphabetic tokens, drawn
    (seeded) in proportion to their first letters with at least `MIN_WORDS_PER_LETTER` of each:
    SAEBench builds absorption's tasks from `tokenizer.vocab` and needs every letter in its probe's
    training split. Tokenising is unchanged; the modules are shared, the model's own tokenizer is
    untouched."""
    from sae_bench.evals.absorption.vocab import convert_tokens_to_string, get_alpha_tokens

    tokenizer = model.tokenizer
    assert tokenizer is not None
    vocab = tokenizer.get_vocab()
    by_letter: dict[str, list[str]] = {}
    for token in get_alpha_tokens(tokenizer, replace_special_chars=False):
        word = convert_tokens_to_string(token, tokenizer)
        by_letter.setdefault(word.strip()[0].lower(), []).append(token)
    total = sum(len(tokens) for tokens in by_letter.values())
    if words >= total:
        return model
    draw = random.Random(seed)
    sample: dict[str, int] = {}
    for letter in sorted(by_letter):
        tokens = sorted(by_letter[letter])
        count = min(len(tokens), max(MIN_WORDS_PER_LETTER, round(words * len(tokens) / total)))
        sample.update({token: vocab[token] for token in draw.sample(tokens, count)})
    view_tokenizer = copy.copy(tokenizer)
    view_tokenizer.get_vocab = lambda: dict(sample)  # `vocab` is a property over get_vocab()
    view = copy.copy(model)  # shallow: same modules, hooks and weights
    view.tokenizer = view_tokenizer
    return view


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
        model if absorption_words is None else _vocabulary_sample(model, absorption_words, config.random_seed)
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
    _seed_everything(config.random_seed)
    # sae-bench 0.6.0 keeps absorption's probes and per-SAE caches in its installed package folder
    # (shared by every run, keyed only by model and SAE name) and more under ./artifacts: this run's
    # go in its own folder, and force_rerun keeps a previous run's SAE of the same name from being read.
    with (
        _serving(served, main),
        _working_directory(work),
        _defaults(
            k_sparse_probing.run_k_sparse_probing_experiment,
            experiment_dir=work / "k_sparse_probing",
            probes_dir=work / "probes",
        ),
        _defaults(
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
        _seed_everything(config.random_seed)
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


def read_headlines(spec: OfflineEval, eval_dir: Path, names: list[str]) -> dict[str, dict[str, float | None]]:
    """{metric label: {sae name: value}} from SAEBench's result files (-1 is SAEBench's NaN)."""
    results = {name: json.loads((eval_dir / f"{name}{RESULT_SUFFIX}").read_text()) for name in names}
    rows: dict[str, dict[str, float | None]] = {}
    for headline in spec.headlines:
        row = {}
        for name in names:
            value = results[name]["eval_result_metrics"].get(headline.category, {}).get(headline.metric)
            row[name] = None if value is None else float(value)
        if any(value is not None for value in row.values()):
            rows[headline.label] = row
    return rows


def read_standard_errors(
    spec: OfflineEval, eval_dir: Path, names: list[str]
) -> dict[str, dict[str, float | None]]:
    """{metric label: {sae name: standard error}} for the headlines whose spread SAEBench reports:
    its standard deviation over the units of the mean (absorption's letters, one result detail
    each) over the square root of their count."""
    results = {name: json.loads((eval_dir / f"{name}{RESULT_SUFFIX}").read_text()) for name in names}
    errors: dict[str, dict[str, float | None]] = {}
    for headline in spec.headlines:
        if headline.spread is None:
            continue
        row: dict[str, float | None] = {}
        for name, result in results.items():
            deviation = result["eval_result_metrics"].get(headline.category, {}).get(headline.spread)
            units = len(result.get("eval_result_details") or [])
            row[name] = None if deviation is None or deviation < 0 or units < 2 else deviation / units**0.5
        errors[headline.label] = row
    return errors


def markdown(table: Mapping[str, Any]) -> str:
    names = table["saes"]
    first = names[0]
    header = ["eval", "metric", *names, *[f"{n} − {first}" for n in names[1:]]]
    lines = [
        f"# SAEBench: {', '.join(names)}"
        + (" (--quick: a smoke test, not a measurement)" if table.get("quick") else ""),
        "",
        f"Model {table['model_name']}, hook {table['hook_name']}, sae-bench {table['sae_bench_version']}. "
        "Arrows: which way SAEBench counts as better (↑ higher, ↓ lower, · neither). ± : SAEBench's "
        "standard error where it reports a spread (absorption: over letters); core and meta_structure "
        "report means only, so a difference there has no interval from SAEBench.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    arrows = {1: "↑", -1: "↓", 0: "·"}
    for eval_name, rows in table["evals"].items():
        better = {h.label: h.better for h in OFFLINE_EVALS[eval_name].headlines}
        errors = table.get("standard_errors", {}).get(eval_name, {})
        for label, row in rows.items():
            cells = [_fmt(row[n]) + _plus_minus(errors.get(label, {}).get(n)) for n in names]
            diffs = [
                _fmt(None if row[n] is None or row[first] is None else row[n] - row[first], signed=True)
                for n in names[1:]
            ]
            lines.append(
                f"| {eval_name} | {label} {arrows[better[label]]} | " + " | ".join(cells + diffs) + " |"
            )
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in table["wall_seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def _plus_minus(error: float | None) -> str:
    return "" if error is None else f" ± {error:.2g}"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def write_table(table: Mapping[str, Any], out: Path) -> None:
    """saebench.json, saebench.md and saebench.png (one panel per headline number, a bar per SAE)."""
    from matplotlib.figure import Figure

    write_file(out / "saebench.json", json.dumps(table, indent=2, default=str))
    write_file(out / "saebench.md", markdown(table))
    panels = [
        (eval_name, label, row) for eval_name, rows in table["evals"].items() for label, row in rows.items()
    ]
    columns = min(4, len(panels))
    n_rows = -(-len(panels) // columns)
    figure = Figure(figsize=(3.4 * columns, 2.8 * n_rows))
    axes = figure.subplots(n_rows, columns, squeeze=False).ravel()
    names = table["saes"]
    for axis, (eval_name, label, row) in zip(axes, panels, strict=False):
        shown = [n for n in names if row[n] is not None]
        values = [row[n] for n in shown]
        errors = table.get("standard_errors", {}).get(eval_name, {}).get(label, {})
        spread = [errors.get(n) or 0.0 for n in shown]
        bars = axis.bar(
            shown,
            values,
            yerr=spread if any(spread) else None,
            capsize=3,
            color=[f"C{names.index(n)}" for n in shown],
        )
        axis.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=7)
        # from 0 (or the values' sign): a zoomed axis made a change of 0.0006 look like a collapse
        low = min(0.0, *(v - e for v, e in zip(values, spread, strict=True)))
        high = max(0.0, *(v + e for v, e in zip(values, spread, strict=True)))
        pad = (high - low) * 0.15 or 1.0
        axis.set_ylim(low - (pad if low < 0 else 0), high + (pad if high > 0 else 0))
        axis.set_title(f"{eval_name}\n{label.split('.', 1)[1]}", fontsize=9)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    title = "error bars: SAEBench's standard error where it reports a spread (absorption, over letters)"
    if table.get("quick"):
        title = "--quick: a smoke test at small sizes, not a measurement; " + title
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with staged_files(out) as staging:
        figure.savefig(staging / "saebench.png", dpi=90)
