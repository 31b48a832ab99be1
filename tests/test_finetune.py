"""End-to-end behaviour of kl_finetune on tiny random TransformerLens models."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import SAE, HookedSAETransformer

from sae_lens_kl import KLFinetuneTrainer, evaluate, kl_finetune
from sae_lens_kl.architectures import FINETUNABLE_INFERENCE

SEQ = 16
DATA = random_tokens(160, seq=SEQ)
EVAL_TOKENS = 32 * SEQ  # the first 32 sequences are held out
FAST = {"eval_tokens": EVAL_TOKENS, "batch_size": 4, "kl_chunk_tokens": 16}


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_kl_finetune_lowers_held_out_kl_more_than_the_mse_control() -> None:
    model = tiny_model()
    sae = make_sae("topk")
    tuned = kl_finetune(sae, model, DATA, tokens=64 * 4 * SEQ // 2, lr=2e-3, **FAST)
    control = kl_finetune(sae, model, DATA, tokens=64 * 4 * SEQ // 2, lr=2e-3, loss="mse", **FAST)
    report, control_report = tuned.cfg.metadata.kl_finetune, control.cfg.metadata.kl_finetune
    before, after = report["before"], report["after"]
    assert before == control_report["before"]  # same held-out tokens, same starting SAE
    assert after["kl"] < 0.8 * before["kl"]
    assert after["kl"] < control_report["after"]["kl"]
    assert after["ce_gap"] < before["ce_gap"]
    assert report["fraction_ce_gap_closed"] > control_report["fraction_ce_gap_closed"]
    # the MSE control does what it says: reconstruction error goes down
    assert control_report["after"]["mse"] < before["mse"]


def test_language_model_is_bit_identical_and_gets_no_gradients() -> None:
    model = tiny_model()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = state(model)
    sae = make_sae("standard")
    sae_weights = state(sae)
    tuned = kl_finetune(sae, model, DATA, tokens=4 * 4 * SEQ, lr=1e-3, **FAST)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    # the SAE the user passed is untouched; the returned one moved
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in sae_weights.items())
    assert not torch.equal(tuned.W_dec, sae.W_dec)


def test_kl_gradient_reaches_sae_parameters_only() -> None:
    model = tiny_model()
    seen: dict[str, Any] = {}

    def inspect(trainer: KLFinetuneTrainer, output: Any) -> None:  # noqa: ARG001
        seen["kl"] = output.metrics["kl"]
        seen["model_grads"] = [p.grad for p in model.parameters()]

    # KL-only: any update of the SAE came through the spliced forward pass.
    sae = make_sae("topk")
    tuned = kl_finetune(sae, model, DATA, tokens=4 * SEQ, loss="kl", lr=1e-3, callbacks=[inspect], **FAST)
    assert seen["kl"] > 0
    assert all(g is None for g in seen["model_grads"])
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert not torch.equal(getattr(tuned, name), getattr(sae, name)), name


@pytest.mark.parametrize("architecture", FINETUNABLE_INFERENCE)
def test_every_inference_architecture_round_trips_through_disk(architecture: str, tmp_path) -> None:
    model = tiny_model()
    sae = make_sae(architecture)
    tuned = kl_finetune(sae, model, DATA, tokens=3 * 4 * SEQ, lr=1e-3, save_dir=tmp_path / "out", **FAST)
    assert type(tuned) is type(sae)
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "kl_finetune_config.json",
        "kl_finetune_metrics.json",
        "checkpoints",
    }
    loaded = SAE.load_from_disk(tmp_path / "out")
    x = torch.randn(20, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), tuned(x))
    metrics = json.loads((tmp_path / "out" / "kl_finetune_metrics.json").read_text())
    assert metrics["after"]["kl"] == tuned.cfg.metadata.kl_finetune["after"]["kl"]
    assert loaded.cfg.metadata.kl_finetune["training_tokens"] == 3 * 4 * SEQ


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_training_saes_keep_their_training_and_return_jumprelu(architecture: str) -> None:
    model = tiny_model()
    training = make_sae(architecture, training=True, k=8)
    with torch.no_grad():
        training.topk_threshold.fill_(0.1)
    tuned = kl_finetune(training, model, DATA, tokens=3 * 4 * SEQ, lr=1e-3, **FAST)
    assert tuned.cfg.architecture() == "jumprelu"
    # BatchTopK's running threshold kept updating during the fine-tune
    assert not torch.allclose(tuned.threshold, torch.full_like(tuned.threshold, 0.1))


HOOK_KINDS = [
    ("blocks.1.hook_resid_pre", None, 32),
    ("blocks.1.hook_resid_mid", None, 32),
    ("blocks.1.hook_resid_post", None, 32),
    ("blocks.1.hook_mlp_out", None, 32),
    ("blocks.1.hook_attn_out", None, 32),
    ("blocks.1.attn.hook_z", None, 32),
    ("blocks.1.attn.hook_z", 1, 8),
]


@pytest.mark.parametrize(("hook_name", "head", "d_in"), HOOK_KINDS)
def test_every_hook_kind_trains_and_plugs_into_hooked_sae_transformer(hook_name, head, d_in) -> None:
    model = tiny_model()
    extra = {"reshape_activations": "hook_z"} if hook_name.endswith("hook_z") and head is None else {}
    sae = make_sae("topk", hook_name=hook_name, d_in=d_in, head_index=head, **extra)
    tuned = kl_finetune(sae, model, DATA, tokens=6 * 4 * SEQ, lr=2e-3, **FAST)
    report = tuned.cfg.metadata.kl_finetune
    assert report["after"]["kl"] < report["before"]["kl"]
    if head is None:
        # the result plugs straight into SAELens's HookedSAETransformer
        sae_model = HookedSAETransformer(model.cfg)
        sae_model.load_state_dict(model.state_dict())
        sae_model.add_sae(tuned)
        tokens = DATA[:4]
        with torch.no_grad():
            spliced_logits = sae_model(tokens)
            result = evaluate(tuned, model, tokens, n_tokens=4 * SEQ, exclude_special_tokens=False)
            ce = torch.nn.functional.cross_entropy(
                spliced_logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
            )
        assert ce.item() == pytest.approx(result.ce_spliced, rel=1e-5)


def test_prefix_reuse_and_two_full_forwards_train_identically() -> None:
    model = tiny_model()
    sae = make_sae("topk")
    reused = kl_finetune(sae, model, DATA, tokens=4 * 4 * SEQ, lr=1e-3, **FAST)
    full = kl_finetune(sae, model, DATA, tokens=4 * 4 * SEQ, lr=1e-3, prefix_reuse=False, **FAST)
    assert reused.cfg.metadata.kl_finetune["prefix_reuse"] is True
    assert full.cfg.metadata.kl_finetune["prefix_reuse"] is False
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(reused, name), getattr(full, name), rtol=1e-4, atol=1e-6)


def test_wandb_logging_through_sae_lens_logger(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    kl_finetune(
        make_sae("topk"),
        tiny_model(),
        DATA,
        tokens=4 * 4 * SEQ,
        lr=1e-3,
        log_to_wandb=True,
        wandb_log_frequency=1,
        **FAST,
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    history = runs[0].read_bytes()
    for key in (
        b"losses/kl_loss",
        b"losses/mse_loss",
        b"metrics/alpha",
        b"metrics/l0",
        b"metrics/weight_stability_decoder_p50",
    ):
        assert key in history, key


def test_bfloat16_language_model_with_float32_sae() -> None:
    model = tiny_model(dtype=torch.bfloat16)
    sae = make_sae("topk")
    tuned = kl_finetune(sae, model, DATA, tokens=8 * 4 * SEQ, lr=2e-3, **FAST)
    report = tuned.cfg.metadata.kl_finetune
    assert tuned.W_dec.dtype == torch.float32
    assert report["after"]["kl"] < report["before"]["kl"]


def test_sparse_topk_activations_train_like_dense_ones() -> None:
    model = tiny_model()
    sae = make_sae("topk")
    options = {"tokens": 6 * 4 * SEQ, "lr": 2e-3, **FAST}
    sparse = kl_finetune(sae, model, DATA, sparse_topk=True, **options)
    dense = kl_finetune(sae, model, DATA, sparse_topk=False, **options)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), rtol=1e-4, atol=1e-6)
    assert not torch.equal(sparse.W_dec, sae.W_dec)


def test_topk_training_sae_with_decoder_norm_rescaling() -> None:
    # SAELens's TopK training default; the sparse-activation path cannot train it (see trainer.py).
    training = make_sae("topk", training=True, rescale_acts_by_decoder_norm=True)
    tuned = kl_finetune(training, tiny_model(), DATA, tokens=6 * 4 * SEQ, lr=2e-3, **FAST)
    report = tuned.cfg.metadata.kl_finetune
    assert report["after"]["kl"] < report["before"]["kl"]


def test_checkpointed_suffix_trains_the_same_weights() -> None:
    # Recomputing the suffix's activations in backward repeats the same deterministic forward, so
    # the gradients and weights are bit-identical to keeping them.
    model = tiny_model()
    sae = make_sae("topk", hook_name="blocks.0.hook_resid_pre")
    options = {"tokens": 4 * 4 * SEQ, "lr": 2e-3, "loss": "e2e+ds", **FAST}
    kept = kl_finetune(sae, model, DATA, **options)
    recomputed = kl_finetune(sae, model, DATA, checkpoint_suffix=True, **options)
    for name, tensor in kept.state_dict().items():
        assert torch.equal(recomputed.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="checkpoint_suffix=True .* needs prefix_reuse=True"):
        kl_finetune(sae, model, DATA, checkpoint_suffix=True, prefix_reuse=False, **options)


def test_kl_only_keeps_the_aux_loss_on_the_kls_scale_over_a_long_run() -> None:
    # aux-k active throughout (a latent is dead after one step without firing); the step's loss is
    # kl * (1 + aux / sae_mse): aux keeps its share of the fitted term at every step instead of
    # SAELens's MSE-scale weight, and the KL still falls over the run
    model = tiny_model()
    sae = make_sae("topk")
    steps: list[dict[str, float]] = []

    def record(_trainer: Any, output: Any) -> None:
        losses = {name: value.item() for name, value in output.losses.items()}
        aux = sum(value for name, value in losses.items() if name not in ("mse_loss", "kl_loss"))
        steps.append(
            {"loss": output.loss.item(), "kl": losses["kl_loss"], "aux": aux, "mse": losses["mse_loss"]}
        )

    tuned = kl_finetune(
        sae,
        model,
        random_tokens(800, seq=SEQ),
        tokens=200 * 4 * SEQ,
        loss="kl",
        lr=1e-3,
        dead_feature_window=1,
        callbacks=[record],
        **{**FAST, "eval_tokens": 0},
    )
    assert len(steps) == 200 and sum(step["aux"] > 0 for step in steps) > 100  # aux-k was on
    for step in steps:
        # float32 terms of ~1: a few ulp
        assert step["loss"] == pytest.approx(step["kl"] * (1 + step["aux"] / step["mse"]), rel=1e-5)
    first, last = (sum(s["kl"] for s in part) / 20 for part in (steps[:20], steps[-20:]))
    assert last < 0.8 * first
    assert (
        evaluate(tuned, model, DATA[:32], n_tokens=32 * SEQ).kl
        < evaluate(sae, model, DATA[:32], n_tokens=32 * SEQ).kl
    )
