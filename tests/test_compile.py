"""compile_blocks: torch.compile'd blocks give the eager results, keep hooks working, and refuse
configurations they cannot serve."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model

from sae_lens_kl import kl_finetune
from sae_lens_kl.splice import CompiledBlocks, HookSite, run_prefix, run_to_output

SEQ = 16
DATA = random_tokens(96, seq=SEQ)
FAST = {"eval_tokens": 16 * SEQ, "batch_size": 4, "kl_chunk_tokens": 16}


def test_compiled_blocks_match_eager_and_the_splice_hook_still_fires() -> None:
    model = tiny_model()
    tokens = random_tokens(2, seq=SEQ)
    site = HookSite.for_model(model, "blocks.1.hook_resid_pre", None)
    torch._dynamo.reset()
    blocks = CompiledBlocks(model)

    def distort(acts: torch.Tensor) -> torch.Tensor:
        return torch.tanh(acts) * 2.0

    with torch.no_grad():
        eager_prefix = run_prefix(model, tokens, site)
        compiled_prefix = run_prefix(model, tokens, site, blocks)
        eager, eager_acts = run_to_output(model, tokens, eager_prefix, site, distort)
        compiled, compiled_acts = run_to_output(model, tokens, compiled_prefix, site, distort)
        clean, _ = run_to_output(model, tokens, compiled_prefix, site)
    torch.testing.assert_close(compiled_prefix.residual, eager_prefix.residual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_acts, eager_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # inductor really ran
    # the hook's block ran eagerly, so the replacement took effect
    assert (compiled - clean).abs().max() > 1e-2


def test_kl_finetune_with_compiled_blocks_matches_eager() -> None:
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sae = make_sae("topk")
    eager = kl_finetune(sae, model, DATA, tokens=3 * 4 * SEQ, lr=1e-3, **FAST)
    compiled = kl_finetune(sae, model, DATA, tokens=3 * 4 * SEQ, lr=1e-3, compile_blocks=True, **FAST)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-4, atol=1e-6)
    assert not torch.equal(compiled.W_dec, sae.W_dec)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_compile_blocks_without_prefix_reuse_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="compile_blocks=True .* prefix_reuse=True"):
        kl_finetune(
            make_sae("topk"), tiny_model(), DATA, tokens=4 * SEQ, compile_blocks=True, prefix_reuse=False
        )


def test_several_saes_with_compiled_blocks_match_eager() -> None:
    model = tiny_model()
    saes = [make_sae("topk", hook_name="blocks.0.hook_resid_post"), make_sae("standard")]
    eager = kl_finetune(saes, model, DATA, tokens=2 * 4 * SEQ, lr=1e-3, **FAST)
    compiled = kl_finetune(saes, model, DATA, tokens=2 * 4 * SEQ, lr=1e-3, compile_blocks=True, **FAST)
    for one, other in zip(compiled, eager, strict=True):
        torch.testing.assert_close(one.W_dec, other.W_dec, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(one.W_enc, other.W_enc, rtol=1e-4, atol=1e-6)


def test_compile_blocks_without_a_compiler_is_refused_up_front(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")  # no g++/clang++ to be found, as on a bare machine
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        kl_finetune(make_sae("topk"), tiny_model(), DATA, tokens=4 * SEQ, compile_blocks=True)
