"""Local Hugging Face folders load offline as HookedTransformers with the HF model's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from sae_lens_kl.models import load_model

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# Both are compared in float64 (u = 1.1e-16; log-probs here are O(10) over 2 layers: ~1e-14
# apart). transformers 5 forms the Llama rotary tables in float32 whatever the dtype (u = 6e-8),
# which moves its log-probs by O(10 u32) = 6e-7 at most; a wrong conversion of
# any weight moves them by O(1e-2) or more.
@pytest.mark.parametrize(
    ("folder_name", "make", "tolerance"),
    [
        # transformers 5's GPT2Config has no n_ctx, which TransformerLens 3.9's converter reads
        (
            "tiny-gpt2",
            lambda vocab: GPT2LMHeadModel(
                GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4)
            ),
            1e-9,
        ),
        # TransformerLens 3.9 reads "llama" in a local path as the model's name
        (
            "my-llama-run",
            lambda vocab: LlamaForCausalLM(
                LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=64, **SHAPE)
            ),
            1e-6,
        ),
    ],
)
def test_local_folder_loads_with_the_hf_models_outputs(
    folder_name: str, make, tolerance: float, tmp_path
) -> None:
    torch.manual_seed(0)
    hf_model = make(len(tiny_tokenizer())).double()
    folder = save(hf_model, tmp_path / folder_name)
    # Compared in float64: the two compute the same function in different operation orders.
    model = load_model(folder, dtype=torch.float64)
    tokens = model.to_tokens("the sparse autoencoder reads the residual stream")
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf_model(tokens).logits.log_softmax(-1)
    assert (ours - theirs).abs().max().item() < tolerance


def test_an_architecture_transformer_lens_cannot_convert_is_one_clear_error(tmp_path) -> None:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tiny_tokenizer()),
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        **SHAPE,
    )
    folder = save(Gemma2ForCausalLM(config), tmp_path / "tiny-gemma")
    with pytest.raises(ValueError, match="Gemma2ForCausalLM is not currently supported.*GPT-2 and Llama"):
        load_model(folder)
