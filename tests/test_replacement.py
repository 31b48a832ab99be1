"""The replacement model of a transcoder set: every transcoder spliced at once, measured against a
plain TransformerLens computation of the same thing."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import make_sae, random_tokens, tiny_model

from sae_lens_kl.replacement import paired_differences, replacement_metrics

SEQ = 16


def transcoder_set(dtype: torch.dtype, layers: range = range(3), seed: int = 1) -> list:
    return [
        make_sae("transcoder", hook_name=f"blocks.{layer}.ln2.hook_normalized", seed=seed + layer).to(dtype)
        for layer in layers
    ]


def test_metrics_equal_a_plain_run_with_hooks_of_the_replacement_model() -> None:
    # float64 throughout: the chunked float32-or-64 kernels and this direct computation agree to
    # rounding (u = 1.1e-16 on values of O(10)), far below 1e-10.
    model = tiny_model(dtype=torch.float64)
    with torch.no_grad():  # a final norm with its own weights, as in real models (fold_ln=False)
        model.ln_final.w.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(3))
        model.ln_final.b.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
    transcoders = transcoder_set(torch.float64)
    tokens = random_tokens(6, seq=SEQ)
    ours = replacement_metrics(transcoders, model, tokens, batch_size=4, exclude_special_tokens=False)

    inputs: dict[int, torch.Tensor] = {}

    def read(acts: torch.Tensor, hook: object, index: int) -> None:  # noqa: ARG001
        inputs[index] = acts

    def write(acts: torch.Tensor, hook: object, index: int) -> torch.Tensor:  # noqa: ARG001
        return transcoders[index](inputs[index])

    hooks = []
    for index, t in enumerate(transcoders):
        hooks.append((t.cfg.metadata.hook_name, functools.partial(read, index=index)))
        hooks.append((t.cfg.metadata.hook_name_out, functools.partial(write, index=index)))
    with torch.no_grad():
        clean = model(tokens).log_softmax(-1)[:, :-1]
        replaced = model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)[:, :-1]
    targets = tokens[:, 1:].unsqueeze(-1)
    expected = {
        "ce_clean": -clean.gather(-1, targets).mean(),
        "ce_replacement": -replaced.gather(-1, targets).mean(),
        "kl": F.kl_div(replaced, clean, log_target=True, reduction="none").sum(-1).mean(),
        "top1_agreement": (clean.argmax(-1) == replaced.argmax(-1)).double().mean(),
    }
    assert ours.n_tokens == 6 * (SEQ - 1)
    for name, value in expected.items():
        assert getattr(ours, name) == pytest.approx(value.item(), abs=1e-10), name
    assert ours.kl > 0 and ours.top1_agreement < 1  # the random set changes the predictions


def test_the_same_set_twice_differs_by_nothing_and_another_set_by_something() -> None:
    model = tiny_model()
    tokens = random_tokens(12, seq=SEQ)
    before = replacement_metrics(transcoder_set(torch.float32), model, tokens)
    again = replacement_metrics(transcoder_set(torch.float32), model, tokens)
    other = replacement_metrics(transcoder_set(torch.float32, seed=7), model, tokens)
    intervals = paired_differences(before, {"again": again, "other": other})
    assert all(interval == [0.0, 0.0] for interval in intervals["again"].values())
    low, high = intervals["other"]["kl"]
    assert low <= other.kl - before.kl <= high and (low, high) != (0.0, 0.0)


def test_a_set_that_is_no_replacement_model_is_refused() -> None:
    model = tiny_model()
    tokens = random_tokens(2, seq=SEQ)
    with pytest.raises(ValueError, match="same hook"):
        replacement_metrics(
            [*transcoder_set(torch.float32, range(1)), *transcoder_set(torch.float32, range(1))],
            model,
            tokens,
        )
    with pytest.raises(ValueError, match="out of order"):
        replacement_metrics(transcoder_set(torch.float32)[::-1], model, tokens)
    with pytest.raises(ValueError, match="hook_name_out"):
        replacement_metrics([make_sae("topk")], model, tokens)
    with pytest.raises(ValueError, match="at least 2"):
        one = replacement_metrics(transcoder_set(torch.float32), model, tokens[:1])
        paired_differences(one, {"same": one})


def test_positions_left_out_are_neither_spliced_nor_scored() -> None:
    # the first positions (an attention sink in real models) keep what flows there, as in training
    # and in the evaluator: the same metrics as splicing only positions >= 2 by hand (float64)
    model = tiny_model(dtype=torch.float64)
    transcoders = transcoder_set(torch.float64)
    tokens = random_tokens(4, seq=SEQ)
    ours = replacement_metrics(
        transcoders, model, tokens, exclude_first_positions=2, exclude_special_tokens=False
    )
    inputs: dict[int, torch.Tensor] = {}

    def read(acts: torch.Tensor, hook: object, index: int) -> None:  # noqa: ARG001
        inputs[index] = acts

    def write(acts: torch.Tensor, hook: object, index: int) -> torch.Tensor:  # noqa: ARG001
        replaced = acts.clone()
        replaced[:, 2:] = transcoders[index](inputs[index])[:, 2:]
        return replaced

    hooks = []
    for index, t in enumerate(transcoders):
        hooks.append((t.cfg.metadata.hook_name, functools.partial(read, index=index)))
        hooks.append((t.cfg.metadata.hook_name_out, functools.partial(write, index=index)))
    with torch.no_grad():
        clean = model(tokens).log_softmax(-1)[:, 2:-1]
        replaced = model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)[:, 2:-1]
    kl = F.kl_div(replaced, clean, log_target=True, reduction="none").sum(-1).mean()
    assert ours.n_tokens == 4 * (SEQ - 3)
    assert ours.kl == pytest.approx(kl.item(), abs=1e-10)
