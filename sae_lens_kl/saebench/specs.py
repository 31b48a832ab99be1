"""What SAEBench (sae-bench 0.6.0) offers here: the evals that run offline, their headline
metrics and quick sizes, the ones that need the hub, and the install line of the extra."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

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


def package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
