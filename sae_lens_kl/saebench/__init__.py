"""SAEBench before and after: SAEBench's own evals (sae-bench 0.6.0) on several SAEs of one model,
their headline numbers in one table (JSON + Markdown, one column per SAE and the difference from
the first) and a paired bar chart, SAEBench's full result files kept beside them.

Runs here, offline: core (reconstruction, CE/KL preservation, sparsity, on a text dataset you
give), absorption (first-letter tasks from the tokenizer's vocabulary) and meta_structure (the
decoder alone). The others need hub datasets or an API key and are refused before any work.

sae-bench is an optional extra (it pins numpy<2 and datasets<4): see `INSTALL`.
"""

from sae_lens_kl.saebench.checks import (
    check_configs,
    check_evals,
    check_names,
    check_out,
    check_saes,
)
from sae_lens_kl.saebench.runners import evaluate_saebench
from sae_lens_kl.saebench.specs import (
    INSTALL,
    KNOWN_EVALS,
    OFFLINE_EVALS,
    RESULT_SUFFIX,
    SAEBenchError,
    sae_bench_module,
)

__all__ = [
    "INSTALL",
    "KNOWN_EVALS",
    "OFFLINE_EVALS",
    "RESULT_SUFFIX",
    "SAEBenchError",
    "check_configs",
    "check_evals",
    "check_names",
    "check_out",
    "check_saes",
    "evaluate_saebench",
    "sae_bench_module",
]
