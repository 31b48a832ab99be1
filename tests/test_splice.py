"""Prefix reuse must reproduce a full hooked forward exactly, for every hook kind."""

from __future__ import annotations

import pytest
import torch
from conftest import D_HEAD, D_MODEL, N_HEADS, random_tokens, tiny_model

from sae_lens_kl.splice import HookSite, hook_width, linear_layout, run_prefix, run_to_output
from sae_lens_kl.vocab import VocabProjection

HOOKS = [
    ("blocks.0.hook_resid_pre", None),
    ("blocks.1.hook_resid_pre", None),
    ("blocks.1.hook_resid_mid", None),
    ("blocks.1.hook_resid_post", None),
    ("blocks.2.hook_resid_post", None),
    ("blocks.1.hook_mlp_out", None),
    ("blocks.1.hook_attn_out", None),
    ("blocks.1.attn.hook_z", None),
    ("blocks.1.attn.hook_z", 2),
]


def distort(acts: torch.Tensor) -> torch.Tensor:
    return torch.tanh(acts) * 3.0 + 0.1


@pytest.mark.parametrize(("hook_name", "head"), HOOKS)
def test_prefix_reuse_equals_full_hooked_forward(hook_name: str, head: int | None) -> None:
    model = tiny_model()
    tokens = random_tokens(3, seq=12)
    site = HookSite.for_model(model, hook_name, head)

    # Reference: TransformerLens's own full forward with a replacement hook, capturing the
    # unembedding input and the logits.
    captured = {}

    def replace(raw: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001
        return site.write(raw, distort(site.read(raw)))

    def keep(x: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001
        captured["h"] = x
        return x

    with torch.no_grad():
        full_logits = model.run_with_hooks(
            tokens, fwd_hooks=[(hook_name, replace), ("unembed.hook_in", keep)]
        )
        prefix = run_prefix(model, tokens, site)
        ours, acts = run_to_output(model, tokens, prefix, site, distort)

    assert torch.equal(ours, captured["h"])
    expected_width = D_HEAD if head is not None else (N_HEADS * D_HEAD if "hook_z" in hook_name else D_MODEL)
    assert acts.shape == (3, 12, expected_width)
    assert hook_width(model, site) == expected_width
    projection = VocabProjection.for_run(model, prefix_reuse=True)
    torch.testing.assert_close(
        projection.logits(ours.flatten(0, 1)), full_logits.flatten(0, 1), rtol=1e-5, atol=1e-5
    )


def test_clean_run_records_the_hook_activation() -> None:
    model = tiny_model()
    tokens = random_tokens(2, seq=10)
    site = HookSite.for_model(model, "blocks.2.hook_resid_mid", None)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        prefix = run_prefix(model, tokens, site)
        _, acts = run_to_output(model, tokens, prefix, site)
        full_logits, _ = run_to_output(model, tokens, None, site)
    assert torch.equal(acts, cache["blocks.2.hook_resid_mid"])
    assert torch.equal(full_logits, logits)


def test_unknown_hook_name_is_a_clear_error() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="blocks.1.hook_resid_pre"):
        HookSite.for_model(model, "blocks.1.hook_resid_pree", None)


def test_softcapped_logits_match_the_model() -> None:
    model = tiny_model(output_logits_soft_cap=2.0)
    tokens = random_tokens(2, seq=8)
    site = HookSite.for_model(model, "blocks.1.hook_resid_pre", None)
    with torch.no_grad():
        out, _ = run_to_output(model, tokens, run_prefix(model, tokens, site), site)
        logits = model(tokens)
    projection = VocabProjection.for_run(model, prefix_reuse=True)
    torch.testing.assert_close(
        projection.logits(out.flatten(0, 1)), logits.flatten(0, 1), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("llama", [False, True])
def test_linear_layout_avoids_transformer_lens_weight_copies_bit_for_bit(llama: bool) -> None:
    """Inside `linear_layout` TransformerLens's per-forward `W.T.contiguous()` of a gated MLP's
    weights is a view (no copy), the forward is bit-identical (the same values reach the same
    F.linear in the same layout), and on exit every weight has its contiguous layout and its
    values back, also after a nested use."""
    overrides = (
        {
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_dim": 8,
            "gated_mlp": True,
            "act_fn": "silu",
            "n_key_value_heads": 2,
        }
        if llama
        else {}
    )
    model = tiny_model(**overrides)
    tokens = random_tokens(2)
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    with torch.no_grad():
        expected = model(tokens)
        with linear_layout(model):
            relaid = [name for name, parameter in model.named_parameters() if not parameter.is_contiguous()]
            with linear_layout(model):
                inner = model(tokens)
            assert not any(model.get_parameter(name).is_contiguous() for name in relaid)
            if llama:
                gate = model.blocks[0].mlp.W_gate
                assert gate.T.contiguous().data_ptr() == gate.data_ptr()
            got = model(tokens)
    assert "blocks.0.attn.W_O" in relaid and "unembed.W_U" not in relaid
    assert ("blocks.0.attn._W_K" in relaid) == llama and ("blocks.0.mlp.W_gate" in relaid) == llama
    assert torch.equal(got, expected) and torch.equal(inner, expected)
    for name, parameter in model.named_parameters():
        assert parameter.is_contiguous(), name
        assert torch.equal(parameter, weights[name]), name
