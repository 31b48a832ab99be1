"""TransformerBridge (no prefix reuse): the fallback of two full hooked forwards per step."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae, tiny_tokenizer

from sae_lens_kl import evaluate, kl_finetune


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3
    )
    hf_model = GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TransformerBridge.boot_transformers(str(folder), tokenizer=tokenizer, hf_model=hf_model)


def test_kl_finetune_on_a_transformer_bridge(bridge) -> None:
    hook = "blocks.1.hook_resid_pre"
    sae = make_sae("topk", hook_name=hook)
    sae.cfg.metadata.model_name = None
    weights = {k: v.clone() for k, v in bridge.state_dict().items()}
    data = torch.randint(0, bridge.cfg.d_vocab, (60, 16), generator=torch.Generator().manual_seed(0))
    tuned = kl_finetune(
        sae,
        bridge,
        data,
        tokens=8 * 4 * 16,
        lr=2e-3,
        batch_size=4,
        eval_tokens=16 * 16,
        exclude_special_tokens=False,
    )
    report = tuned.cfg.metadata.kl_finetune
    assert report["prefix_reuse"] is False
    assert report["after"]["kl"] < report["before"]["kl"]
    assert all(torch.equal(v, bridge.state_dict()[k]) for k, v in weights.items())

    # The spliced CE agrees with the bridge's own hooked forward.
    tokens = data[:4]

    def splice(acts: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001
        return tuned(acts)

    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
        result = evaluate(tuned, bridge, tokens, n_tokens=4 * 16, exclude_special_tokens=False)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert ce.item() == pytest.approx(result.ce_spliced, rel=1e-5)
