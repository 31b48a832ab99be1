"""LoRA on the language model after the SAE (Chen et al. 2025): the hook-based update equals the
weight update it stands for, training leaves the base weights and the SAE bit-identical, the
adapter is its own artifact, resumable, and bad input is refused up front."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import HookedSAETransformer

from sae_lens_kl import KLFinetuneTrainer, kl_finetune
from sae_lens_kl.lm_lora import LM_LORA_FILENAME, LMLoRA, lm_lora_targets, load_lm_lora

SEQ = 16
DATA = random_tokens(60, seq=SEQ)
STEP_TOKENS = 4 * SEQ
OPTIONS = {"tokens": 6 * STEP_TOKENS, "batch_size": 4, "eval_tokens": 8 * SEQ, "lr": 5e-3, "loss": "kl"}
HOOK = "blocks.1.hook_resid_pre"  # make_sae's hook


def llama_like(dtype: torch.dtype = torch.float64) -> Any:
    """A tiny model with what Llama-family models have: RMSNorm, rotary, gated MLP, grouped-query
    attention (2 key/value heads for 4 query heads)."""
    return tiny_model(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=2,
        dtype=dtype,
    )


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@torch.no_grad()
def kl_to_clean(model: Any, tokens: torch.Tensor, hooks: list[Any]) -> float:
    clean = model(tokens).log_softmax(-1)
    spliced = model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)
    return float((clean.exp() * (clean - spliced)).sum(-1).mean())


@pytest.mark.parametrize("make_model", [tiny_model, llama_like], ids=["gpt2-like", "llama-like"])
def test_the_hooks_apply_exactly_the_weight_update(make_model: Any) -> None:
    # Compared in float64: the hooks compute x W + x (BA)^T, the merged model x (W + (BA)^T).
    model = make_model(dtype=torch.float64) if make_model is tiny_model else make_model()
    targets = lm_lora_targets(model, HOOK)
    assert {t.name.split(".")[1] for t in targets} == {"1", "2"}  # blocks after the SAE's hook only
    expected = {"W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"} | ({"W_gate"} if model.cfg.gated_mlp else set())
    assert {t.name.split(".")[-1] for t in targets} == expected
    lora = LMLoRA(targets, 3).double()
    tokens = DATA[:2]
    base = model(tokens)
    with lora.applied(model):
        assert torch.equal(model(tokens), base)  # B = 0: the adapted model is the base model, bit for bit
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in lora.B:
            b.copy_(torch.randn(b.shape, generator=generator, dtype=torch.float64) * 0.1)
    merged = copy.deepcopy(model)
    state = merged.state_dict()
    for target, a, b in zip(lora.targets, lora.A, lora.B, strict=True):
        tensor = state[state_key(model, target.name)]
        delta = (b @ a).T.detach()  # [in, out]
        if target.name.endswith(("W_Q", "W_K", "W_V")):  # [heads, d_model, d_head]
            delta = delta.view(tensor.shape[1], tensor.shape[0], tensor.shape[2]).transpose(0, 1)
        tensor += delta.reshape(tensor.shape)
    with lora.applied(model):
        adapted = model(tokens)
    torch.testing.assert_close(adapted, merged(tokens), rtol=0, atol=1e-10)
    assert not torch.allclose(adapted, model(tokens), atol=1e-3)  # and the update matters


def state_key(model: Any, weight_name: str) -> str:
    """The state-dict key of a LoRA target's weight ("blocks.1.W_Q" -> "blocks.1.attn.W_Q"; with
    grouped-query attention the key/value weights are stored per key/value head as _W_K/_W_V)."""
    block, weight = weight_name.rsplit(".", 1)
    if weight in ("W_K", "W_V") and model.cfg.n_key_value_heads:
        return f"{block}.attn._{weight}"
    return f"{block}.{'attn' if weight in ('W_Q', 'W_K', 'W_V', 'W_O') else 'mlp'}.{weight}"


def test_lm_lora_trains_with_the_lm_and_sae_frozen(tmp_path) -> None:
    model, sae = tiny_model(), make_sae("topk")
    model_before, sae_before = weights(model), weights(sae)
    out = tmp_path / "out"
    tuned = kl_finetune(sae, model, DATA, lm_lora_rank=2, save_dir=out, **OPTIONS)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in model_before.items())  # bit-identical
    assert all(torch.equal(tuned.state_dict()[n], t) for n, t in sae_before.items())
    report = tuned.cfg.metadata.kl_finetune
    assert report["after"]["kl"] < report["before"]["kl"]

    lora = load_lm_lora(out, model)
    assert (out / LM_LORA_FILENAME).is_file() and any(b.abs().sum() > 0 for b in lora.B)
    splice = [(HOOK, lambda acts, hook: sae(acts))]  # noqa: ARG005
    tokens = DATA[:8]
    assert kl_to_clean(model, tokens, splice + lora.hooks()) < kl_to_clean(model, tokens, splice)

    # The hand-off: a HookedSAETransformer with the SAE added and the LoRA attached.
    hooked = HookedSAETransformer(model.cfg)
    hooked.load_state_dict(model.state_dict())
    hooked.add_sae(sae)
    lora.attach(hooked)
    by_hand = model.run_with_hooks(tokens, fwd_hooks=splice + lora.hooks())
    torch.testing.assert_close(hooked(tokens), by_hand, rtol=0, atol=0)
    hooked.reset_hooks(including_permanent=True)
    assert not torch.equal(hooked(tokens), by_hand)


def test_lm_lora_on_all_layers_adapts_the_sae_input_too(tmp_path) -> None:
    # float64: the report's held-out KL is compared with a direct computation of the same model
    model, sae = tiny_model(dtype=torch.float64), make_sae("topk", dtype="float64")
    assert {t.name.split(".")[1] for t in lm_lora_targets(model, HOOK, "all")} == {"0", "1", "2"}
    model_before, sae_before = weights(model), weights(sae)
    out = tmp_path / "out"
    tuned = kl_finetune(sae, model, DATA, lm_lora_rank=2, lm_lora_layers="all", save_dir=out, **OPTIONS)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in model_before.items())
    assert all(torch.equal(tuned.state_dict()[n], t) for n, t in sae_before.items())
    report = tuned.cfg.metadata.kl_finetune
    assert report["after"]["kl"] < report["before"]["kl"]
    lora = load_lm_lora(out, model)
    # block 0 comes before the SAE: its updates trained through the SAE's input
    assert all(
        b.abs().sum() > 0 for t, b in zip(lora.targets, lora.B, strict=True) if t.name.startswith("blocks.0.")
    )
    # the spliced model: LoRA everywhere, the SAE encoding what arrives at its hook
    splice = [(HOOK, lambda acts, hook: sae(acts))]  # noqa: ARG005
    held_out = DATA[: OPTIONS["eval_tokens"] // SEQ]
    assert report["after"]["kl"] == pytest.approx(
        kl_to_clean(model, held_out, lora.hooks() + splice), rel=1e-9
    )


def test_a_run_with_lm_lora_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    class Crash(RuntimeError):
        pass

    def crash_at_3(trainer: KLFinetuneTrainer, output: Any) -> None:  # noqa: ARG001
        if trainer.n_training_steps == 3:
            raise Crash

    options = {**OPTIONS, "lm_lora_rank": 2, "checkpoint_every_tokens": STEP_TOKENS}
    sae, model = make_sae("topk"), tiny_model()
    with pytest.raises(Crash):
        kl_finetune(sae, model, DATA, save_dir=tmp_path / "a", callbacks=[crash_at_3], **options)
    kl_finetune(sae, model, DATA, save_dir=tmp_path / "a", resume_from=tmp_path / "a", **options)
    kl_finetune(sae, model, DATA, save_dir=tmp_path / "b", **options)
    resumed, uninterrupted = (weights(load_lm_lora(tmp_path / name, model)) for name in ("a", "b"))
    assert all(torch.equal(resumed[name], tensor) for name, tensor in uninterrupted.items())


def test_lm_lora_bad_input(tmp_path) -> None:
    model, options = tiny_model(), {"tokens": STEP_TOKENS, "batch_size": 4, "eval_tokens": 0}
    with pytest.raises(ValueError, match="lm_lora_rank needs save_dir"):
        kl_finetune(make_sae("topk"), model, DATA, lm_lora_rank=2, **options)
    with pytest.raises(ValueError, match="lm_lora_rank=0 must be a positive integer"):
        kl_finetune(make_sae("topk"), model, DATA, lm_lora_rank=0, save_dir=tmp_path, **options)
    with pytest.raises(ValueError, match="lm_lora_rank=32 must be below 32"):
        kl_finetune(make_sae("topk"), model, DATA, lm_lora_rank=32, save_dir=tmp_path, **options)
    with pytest.raises(ValueError, match="lm_lora_rank with loss='mse'"):
        kl_finetune(make_sae("topk"), model, DATA, lm_lora_rank=2, loss="mse", save_dir=tmp_path, **options)
    with pytest.raises(ValueError, match="adapter and lm_lora_rank both set"):
        kl_finetune(
            make_sae("topk"), model, DATA, lm_lora_rank=2, adapter="mlp", save_dir=tmp_path, **options
        )
    last = make_sae("topk", hook_name="blocks.2.hook_resid_post")
    with pytest.raises(ValueError, match="No block of this model comes after blocks.2.hook_resid_post"):
        kl_finetune(last, model, DATA, lm_lora_rank=2, save_dir=tmp_path, **options)
    with pytest.raises(ValueError, match="no LoRA on the LM"):
        kl_finetune(
            [make_sae("topk"), make_sae("topk", seed=2)],
            model,
            DATA,
            lm_lora_rank=2,
            save_dir=tmp_path,
            **options,
        )
    with pytest.raises(ValueError, match="lm_lora_layers='all' needs lm_lora_rank"):
        kl_finetune(make_sae("topk"), model, DATA, lm_lora_layers="all", save_dir=tmp_path, **options)
    with pytest.raises(ValueError, match="lm_lora_layers='some' is not one of"):
        kl_finetune(make_sae("topk"), model, DATA, lm_lora_rank=2, lm_lora_layers="some", **options)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    LMLoRA(lm_lora_targets(model, HOOK), 2, model_name="tiny-test-model").save(tmp_path / LM_LORA_FILENAME)
    other = tiny_model()
    other.cfg.model_name = "another-model"
    with pytest.raises(ValueError, match="was trained on 'tiny-test-model', not this model"):
        load_lm_lora(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="No LM LoRA at"):
        load_lm_lora(tmp_path / "nope", model)
