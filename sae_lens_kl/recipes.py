"""The demo's recipe, each setting once: the MSE phase (`MSERecipe`), the KL phase's lr and batch,
and the run sizes. The demo, the experiments, the sweeps, the tutorials and
benchmarks/demo_recipe.py derive theirs from these with `dataclasses.replace`. (This module
imports nothing heavy, so the command line's `--help` can read its defaults.)"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_lens import LanguageModelSAERunnerConfig


@dataclasses.dataclass(frozen=True)
class MSERecipe:
    """An MSE phase with SAELens's runner: every setting `train.runner_config` takes besides the
    model, hook and data."""

    architecture: str = "topk"
    d_sae: int = 4608
    # K/d_model 5.6 %, inside the paper's 1-7 %. Chosen December 5 on the validation split (the
    # sweep's 2e-4 x 48 cell, docs/demo.md): KL+MSE minus its control k=16 +11.0 points but 53 %
    # of latents dead, k=32 +9.0 [+6.3, +11.6] with 0.3 % dead, k=64 +7.1 [+2.4, +11.7].
    k: float = 32
    tokens: int = 184_320
    context_size: int = 128
    # with 512-token batches (at k=32, lr 4e-4 with 1024-token batches reached an explained
    # variance of ~0.54 instead of ~0.76)
    lr: float = 2e-3
    batch_tokens: int = 512
    # SmolLM2's first positions are an attention sink (residual norms ~100x the rest)
    sink_positions: int = 2
    # The last 20 % of steps decay the lr linearly to 0 (sae-lens 6.54.12 with its constant
    # scheduler decays from lr to 0; its lr_end, lr / 10, applies to cosine annealing only). Held-out
    # explained variance / dead latents of 4608 (benchmarks/demo_recipe.py, the demo, the
    # sparsity sweep; b_dec from zeros): k=32 without decay 0.754 / 159, k=32 0.772 / 287,
    # k=64 0.822 / 25, k=128 0.869 / 24; k=64 with b_dec from the mean 0.832 / 6.
    lr_decay_fraction: float = 0.2
    dead_feature_window: int | None = None
    """Steps; None: 5 % of the run's steps (train.runner_config)."""
    seed: int = 42
    # SAELens's standard (ReLU) SAE, experiment E's second arm: at SAELens's default 1.0 the
    # earlier recipes left it dense (L0 ~1,000 of 4,608); 20 gives L0 44 (K/d_model 7.6 %, just
    # above the paper's 1-7 %) at explained variance 0.71, 5 gives L0 229 (benchmarks/relu_l1.py,
    # December 6). TopK has none.
    l1_coefficient: float = 20.0
    normalize_activations: str = "none"
    """SAELens's input normalisation during the MSE phase ('expected_average_only_in': inputs
    scaled to norm sqrt(d_in), the factor folded into the weights at the end, so the saved SAE
    reads raw activations)."""
    b_dec_init: str = "mean"
    """Where the decoder bias starts: 'mean' (of the first training batch's activations;
    train.mse_phase) or SAELens's zeros. Measured (docs/demo.md): on Gemma-3-270m zeros leave
    3,494 of 4,608 latents dead, the mean 209; on SmolLM2 (k=64) 25 vs 6."""

    def runner_config(self, model: Any, hook: str, dataset_name: str) -> LanguageModelSAERunnerConfig[Any]:
        from sae_lens_kl.train import runner_config

        settings = dataclasses.asdict(self)
        del settings["b_dec_init"]  # not a runner setting: mse_phase applies it
        return runner_config(model, hook, dataset_name=dataset_name, **settings)


DEMO_MSE_RECIPE = MSERecipe()
DEMO_HOOK = "blocks.15.hook_resid_post"
# The KL phase: 192 steps of 2 sequences at lr 4e-4, chosen on the validation split (docs/demo.md)
# among lr x batch cells of the same 49,152 tokens: at k=32, 8 x 48 at 2e-4 +9.0 points over the
# MSE-only control [+6.3, +11.6], 2 x 192 at 2e-4 +13.0 [+9.8, +16.1], at 4e-4 +13.1 [+9.0, +17.2].
# Adam's step is scaled by the gradient's running RMS, so its size depends little on the batch and
# smaller batches moved the SAE further per token; the paper's 5e-5 is for ~12k steps.
DEMO_KL_LR = 4e-4
KL_BATCH_SEQUENCES = 2
"""Sequences per KL step in the demo, the experiments and the sweeps (`--kl-batch`)."""

# The demo's run lengths, and the minutes-long ones of `experiment --quick`.
DEMO_SIZES = {
    "mse_tokens": DEMO_MSE_RECIPE.tokens,
    "kl_steps": 192,
    "eval_tokens": 20_480,
    "d_sae": DEMO_MSE_RECIPE.d_sae,
}
QUICK_SIZES = {"mse_tokens": 16_384, "kl_steps": 4, "eval_tokens": 2_048, "d_sae": 1152}
