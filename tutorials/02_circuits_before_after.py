"""Tutorial: does a KL fine-tune hide less of a circuit in the SAE's error node? — fully offline.

Attribution patching (Marks et al. 2024) scores every SAE latent and the error node (what the SAE
fails to reconstruct) for a metric. With a more faithful SAE the error node should carry less of
the effect. This runs the same analysis on an SAE before and after `kl_finetune`:

    python tutorials/02_circuits_before_after.py      # ~6 minutes on 2 CPU cores

The same functions take any SAELens SAEs (e.g. `SAE.from_pretrained(...)` with the hub) and any
metric on the logits.
"""

from __future__ import annotations

import os
from dataclasses import replace

from sae_lens_kl import kl_finetune
from sae_lens_kl.circuits import circuits_markdown, compare_circuits, induction_task
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.data import take, token_sequences
from sae_lens_kl.models import load_model
from sae_lens_kl.recipes import DEMO_HOOK, DEMO_MSE_RECIPE
from sae_lens_kl.train import kl_phase_sequences, mse_phase

HOOK = DEMO_HOOK
CONTEXT = DEMO_MSE_RECIPE.context_size
# SAE_LENS_KL_QUICK=1: the same steps at a seconds-long size (how tests/test_tutorials.py runs it).
QUICK = os.environ.get("SAE_LENS_KL_QUICK") == "1"
MSE_TOKENS, KL_STEPS, PROMPTS = (4_096, 2, 4) if QUICK else (60_000, 12, 16)

# 1. The offline model and text, and an SAE trained with SAELens's runner (as in tutorial 01).
model = load_model("smollm2")
corpus = django_docs()
# The demo's MSE recipe (sae_lens_kl.recipes), smaller and without its final lr decay.
recipe = replace(DEMO_MSE_RECIPE, d_sae=2304, k=64, tokens=MSE_TOKENS, lr_decay_fraction=0.0)
cfg = recipe.runner_config(model, HOOK, dataset_name="django-docs")
before = mse_phase(cfg, model, corpus.train, cfg.training_tokens, b_dec_init=recipe.b_dec_init)

# 2. The KL+MSE fine-tune, on the text after every sequence the MSE phase read.
kl_tokens, _ = kl_phase_sequences(
    cfg, model, corpus.train, cfg.training_tokens, KL_STEPS * 8 * CONTEXT, recipe.b_dec_init
)
after = kl_finetune(
    before,
    model,
    kl_tokens,
    tokens=kl_tokens.numel(),
    lr=5e-4,
    batch_size=8,
    context_size=CONTEXT,
    eval_tokens=0,
    exclude_first_positions=2,
)

# 3. A task the model solves: induction on spans of held-out text (BOS + span + the same span);
#    the metric is the mean log-probability of the repeated span's tokens. Check the clean model
#    first: a circuit analysis of a task the model fails says little.
text = take(token_sequences(corpus.eval, model, CONTEXT, False), 4)
task = induction_task(model, text, n_prompts=PROMPTS, length=24)
print(f"{task.name}: the clean model's top-1 accuracy is {task.accuracy:.1%}")

# 4. Attribution with the error node, before and after: the error node's share of the attributed
#    effect, the top nodes, and how much of the metric the top-N latents (+ error) recover.
result = compare_circuits(
    {"before": before, "after": after}, model, task.tokens, task.metric, sizes=(1, 10, 100)
)
print(circuits_markdown(task, result))
