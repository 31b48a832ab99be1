"""`evaluate` agrees with sae_lens.evals on the same tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import clean_and_spliced_at, make_sae, random_tokens, sentences, tiny_model, tiny_text_model
from datasets import Dataset
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_kl import evaluate
from sae_lens_kl.data import take, token_sequences

CTX = 16
N_BATCHES = 3
BATCH = 4


def store(model, tokens: torch.Tensor, hook_name: str) -> ActivationsStore:
    """A real SAELens ActivationsStore over pre-tokenised sequences, in order."""
    dataset = Dataset.from_dict({"tokens": tokens.tolist()})
    return ActivationsStore(
        model=model,
        dataset=dataset,
        streaming=False,
        hook_name=hook_name,
        hook_head_index=None,
        context_size=CTX,
        d_in=32,
        n_batches_in_buffer=2,
        total_training_tokens=tokens.numel(),
        store_batch_size_prompts=BATCH,
        train_batch_size_tokens=BATCH * CTX,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_evaluate_agrees_with_sae_lens_evals(architecture: str) -> None:
    model = tiny_text_model()
    hook_name = "blocks.1.hook_resid_pre"
    sae = make_sae(architecture, hook_name=hook_name)
    tokens = take(token_sequences(sentences(200), model, CTX, prepend_bos=True), N_BATCHES * BATCH)
    assert tokens is not None and (tokens == model.tokenizer.bos_token_id).sum() > N_BATCHES * BATCH

    ours = evaluate(sae, model, tokens, n_tokens=N_BATCHES * BATCH * CTX, batch_size=BATCH)

    # sae_lens's reset_input_dataset does not rewind the token stream (6.54), so each metric group
    # gets a fresh store over the same tokens.
    reconstruction, _ = run_evals(
        sae,
        store(model, tokens, hook_name),
        model,
        ActivationScaler(),
        EvalConfig(
            batch_size_prompts=BATCH,
            n_eval_reconstruction_batches=N_BATCHES,
            compute_kl=True,
            compute_ce_loss=True,
        ),
    )
    sparsity, _ = run_evals(
        sae,
        store(model, tokens, hook_name),
        model,
        ActivationScaler(),
        EvalConfig(
            batch_size_prompts=BATCH,
            n_eval_sparsity_variance_batches=N_BATCHES,
            compute_sparsity_metrics=True,
            compute_variance_metrics=True,
        ),
    )
    performance = reconstruction["model_performance_preservation"]
    behaviour = reconstruction["model_behavior_preservation"]
    expected = {
        "ce_clean": performance["ce_loss_without_sae"],
        "ce_spliced": performance["ce_loss_with_sae"],
        "ce_ablated": performance["ce_loss_with_ablation"],
        "ce_score": performance["ce_loss_score"],
        "kl": behaviour["kl_div_with_sae"],
        "kl_ablated": behaviour["kl_div_with_ablation"],
        "kl_score": behaviour["kl_div_score"],
        "l0": sparsity["sparsity"]["l0"],
        "mse": sparsity["reconstruction_quality"]["mse"],
        "explained_variance": sparsity["reconstruction_quality"]["explained_variance"],
    }
    got = ours.to_dict()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert ours.ce_gap == pytest.approx(ours.ce_spliced - ours.ce_clean)
    assert ours.kl > 0 and ours.ce_gap != 0


def test_reused_baseline_gives_the_same_numbers_as_a_fresh_evaluation() -> None:
    from sae_lens_kl.evaluation import HeldOutEvaluator

    model = tiny_text_model()
    tokens = take(token_sequences(sentences(100), model, CTX, prepend_bos=True), 8)
    first, second = make_sae("topk", seed=1), make_sae("standard", seed=2)
    options = {
        "batch_size": BATCH,
        "special_token_ids": [0, 1],
        "exclude_first_positions": 1,
        "chunk_tokens": 7,
    }
    shared = HeldOutEvaluator(model, tokens, **options)
    shared(first)
    assert shared(second) == HeldOutEvaluator(model, tokens, **options)(second)


def test_downstream_error_at_every_later_residual_hook() -> None:
    # Recomputed with plain run_with_hooks / run_with_cache, in float64 (only rounding separates
    # the two: bound 1e-9 relative).
    model = tiny_model(dtype=torch.float64)
    sae = make_sae("topk", hook_name="blocks.0.hook_resid_post", dtype="float64")
    tokens = random_tokens(8, seq=16)
    result = evaluate(sae, model, tokens, n_tokens=8 * 16, batch_size=4)
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert list(result.downstream_mse) == hooks
    clean, spliced = clean_and_spliced_at(model, tokens, "blocks.0.hook_resid_post", sae, hooks)
    for hook in hooks:
        expected = (spliced[hook] - clean[hook]).pow(2).sum(-1).mean().item()
        assert result.downstream_mse[hook] == pytest.approx(expected, rel=1e-9)
    assert all(value > 0 for value in result.downstream_mse.values())


def counting(model, hook_name: str) -> list[int]:
    """A permanent hook that counts the forward passes reaching `hook_name`."""
    calls: list[int] = []

    def count(raw: torch.Tensor, hook: object) -> torch.Tensor:  # noqa: ARG001
        calls.append(1)
        return raw

    model.add_hook(hook_name, count, is_permanent=True)
    return calls


def test_a_shared_evaluator_runs_the_clean_pass_once_and_gives_the_same_numbers() -> None:
    from sae_lens_kl import HeldOutEvaluator

    model, tokens = tiny_model(), random_tokens(12, seq=CTX)
    first, second = make_sae("topk", seed=1), make_sae("standard", seed=2)
    alone = [
        evaluate(sae, model, tokens, n_tokens=tokens.numel(), batch_size=BATCH) for sae in (first, second)
    ]
    shared = HeldOutEvaluator.for_data(
        model, tokens, n_tokens=tokens.numel(), context_size=CTX, batch_size=BATCH
    )
    prefix_calls = counting(model, "blocks.0.hook_resid_pre")  # in the prefix, before the SAE's block
    assert shared(first) == alone[0]
    assert len(prefix_calls) == N_BATCHES
    # the second SAE at the same hook: only its spliced suffix runs, with the same result as alone
    assert shared(second) == alone[1]
    assert len(prefix_calls) == N_BATCHES
    # an SAE already evaluated: its stored result, no forward pass at all
    suffix_calls = counting(model, "blocks.2.hook_resid_pre")
    assert shared(first) == alone[0]
    assert not suffix_calls
    model.reset_hooks(including_permanent=True)


def test_the_clean_pass_is_not_kept_beyond_the_memory_budget() -> None:
    from sae_lens_kl import HeldOutEvaluator

    model, tokens = tiny_model(), random_tokens(12, seq=CTX)
    evaluator = HeldOutEvaluator.for_data(
        model, tokens, n_tokens=tokens.numel(), context_size=CTX, batch_size=BATCH, clean_cache_bytes=1000
    )
    first = evaluator(make_sae("topk", seed=1))
    prefix_calls = counting(model, "blocks.0.hook_resid_pre")
    assert evaluator(make_sae("standard", seed=2)) == evaluate(
        make_sae("standard", seed=2), model, tokens, n_tokens=tokens.numel(), batch_size=BATCH
    )
    assert len(prefix_calls) == 2 * N_BATCHES  # recomputed (once above, once by evaluate)
    assert first.n_tokens == tokens.numel()
    model.reset_hooks(including_permanent=True)


def test_fine_tunes_sharing_an_evaluator_report_what_their_own_evaluation_would() -> None:
    from sae_lens_kl import HeldOutEvaluator, kl_finetune

    model, data = tiny_model(), random_tokens(96, seq=CTX)
    held_out, train = data[:16], data[16:]
    options = {"tokens": 8 * BATCH * CTX, "lr": 2e-3, "batch_size": BATCH, "kl_chunk_tokens": 16}
    options.update(eval_batch_size=BATCH, exclude_first_positions=1)
    own = kl_finetune(
        make_sae("topk"), model, train, eval_data=held_out, eval_tokens=held_out.numel(), **options
    )
    evaluator = HeldOutEvaluator.for_data(
        model,
        held_out,
        n_tokens=held_out.numel(),
        context_size=CTX,
        batch_size=BATCH,
        exclude_first_positions=1,
    )
    shared = kl_finetune(make_sae("topk"), model, train, evaluator=evaluator, **options)
    control = kl_finetune(make_sae("topk"), model, train, evaluator=evaluator, loss="mse", **options)
    mine, theirs = own.cfg.metadata.kl_finetune, shared.cfg.metadata.kl_finetune
    assert (theirs["before"], theirs["after"]) == (mine["before"], mine["after"])
    assert control.cfg.metadata.kl_finetune["before"] == mine["before"]

    with pytest.raises(ValueError, match="not both"):
        kl_finetune(make_sae("topk"), model, train, evaluator=evaluator, eval_data=held_out, **options)
    with pytest.raises(ValueError, match="exclude_first_positions is 1 but this fine-tune's is 0"):
        kl_finetune(
            make_sae("topk"), model, train, evaluator=evaluator, **{**options, "exclude_first_positions": 0}
        )
