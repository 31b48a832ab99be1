"""Paired bootstrap intervals over held-out sequences, and the CE-gap fraction when undefined."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model

from sae_lens_kl import HeldOutEvaluator, kl_finetune
from sae_lens_kl.intervals import fraction_closed, paired_intervals

SEQ = 16
DATA = random_tokens(60, seq=SEQ)


@pytest.fixture(scope="module")
def evaluated():
    model = tiny_model()
    evaluator = HeldOutEvaluator(
        model, DATA[:12], batch_size=5, special_token_ids=[], exclude_first_positions=1, chunk_tokens=16
    )
    sae = make_sae("topk")
    options = {
        "tokens": 8 * 4 * SEQ,
        "batch_size": 4,
        "kl_chunk_tokens": 16,
        "lr": 2e-3,
        "evaluator": evaluator,
        "exclude_first_positions": 1,
    }
    tuned = kl_finetune(sae, model, DATA[12:], **options)
    control = kl_finetune(sae, model, DATA[12:], loss="mse", **options)
    return evaluator(sae), evaluator(tuned), evaluator(control)


def test_per_sequence_sums_add_up_to_the_reported_means(evaluated) -> None:
    for result in evaluated:
        sums = {
            name: torch.tensor(values, dtype=torch.float64) for name, values in result.per_sequence.items()
        }
        assert len(sums["n_tokens"]) == 12 and sums["n_tokens"].sum() == 12 * (SEQ - 2)  # CE rows: 16-1-1
        # the same float64 terms summed in another order: relative rounding ~ n * 2^-53
        for name in ("ce_clean", "ce_spliced"):
            assert sums[name].sum() / sums["n_tokens"].sum() == pytest.approx(
                getattr(result, name), rel=1e-12
            )


def test_intervals_hold_the_point_estimate_and_vanish_for_identical_runs(evaluated) -> None:
    before, tuned, control = evaluated
    intervals = paired_intervals(before, {"kl+mse": tuned, "mse": control, "same": tuned}, control="mse")
    low, high = intervals["fraction_ce_gap_closed"]["kl+mse"]
    assert low < fraction_closed(before, tuned) < high
    # the difference of a run from an identical one is 0 on every resample: pairing, not noise
    assert intervals["difference_from_control"]["kl+mse"] != [0.0, 0.0]
    same = paired_intervals(before, {"a": tuned, "b": tuned}, control="b")
    assert same["difference_from_control"]["a"] == [0.0, 0.0]
    assert paired_intervals(before, {"before": before})["fraction_ce_gap_closed"]["before"] == [0.0, 0.0]


def test_a_bootstrap_needs_two_sequences_and_paired_runs(evaluated) -> None:
    before, tuned, _ = evaluated
    one = dataclasses.replace(before, per_sequence={k: v[:1] for k, v in before.per_sequence.items()})
    with pytest.raises(ValueError, match="at least 2 of them; this evaluation has 1"):
        paired_intervals(one, {"after": tuned})
    shifted = dataclasses.replace(
        tuned, per_sequence={k: v[1:] + v[:1] for k, v in tuned.per_sequence.items()}
    )
    with pytest.raises(ValueError, match="evaluated on other sequences"):
        paired_intervals(before, {"after": shifted})


def test_the_fraction_closed_is_undefined_when_there_is_no_gap(evaluated) -> None:
    from sae_lens_kl.report import _fraction_cell

    before, tuned, _ = evaluated
    no_gap = dataclasses.replace(before, ce_spliced=before.ce_clean - 0.01, ce_gap=-0.01)
    assert fraction_closed(no_gap, tuned) is None
    report = {"fraction_ce_gap_closed": None, "fraction_ce_gap_closed_note": "undefined: ..."}
    assert _fraction_cell(report) == "undefined (starting gap ≤ 0)"


def test_seeds_add_their_spread_to_the_interval(evaluated) -> None:
    before, tuned, control = evaluated
    single = paired_intervals(before, {"kl+mse": tuned, "mse": control}, control="mse")
    # three identical seeds: seed weights sum to 1, so every resample equals the single run's
    # (to the rounding of a weighted sum of three float64 terms)
    copies = paired_intervals(before, {"kl+mse": [tuned] * 3, "mse": [control] * 3}, control="mse")
    assert copies["n_seeds"] == 3
    for key in ("fraction_ce_gap_closed", "difference_from_control"):
        assert copies[key]["kl+mse"] == pytest.approx(single[key]["kl+mse"], rel=1e-12, abs=1e-12)
    # two different seeds: their mean (the run whose per-sequence CE is the seeds' average, since
    # clean CE and token counts are shared) has a sequence-only interval; drawing the seeds too
    # widens it
    averaged = dataclasses.replace(
        tuned,
        per_sequence={
            **tuned.per_sequence,
            "ce_spliced": [
                (a + b) / 2
                for a, b in zip(
                    tuned.per_sequence["ce_spliced"], control.per_sequence["ce_spliced"], strict=True
                )
            ],
        },
    )
    mean_only = paired_intervals(before, {"mean": averaged})["fraction_ce_gap_closed"]["mean"]
    over_seeds = paired_intervals(before, {"mean": [tuned, control]})["fraction_ce_gap_closed"]["mean"]
    assert over_seeds[1] - over_seeds[0] > mean_only[1] - mean_only[0]
    with pytest.raises(ValueError, match="different numbers of seeds"):
        paired_intervals(before, {"a": [tuned, control], "b": [tuned] * 3})
    with pytest.raises(ValueError, match="different numbers of seeds"):
        paired_intervals(before, {"a": []})


def test_no_interval_of_a_fraction_that_is_undefined(evaluated) -> None:
    # a starting SAE with no CE gap of its own (spliced CE below clean on every sequence): some
    # resamples could still draw a positive gap, but they would describe another SAE
    before, tuned, control = evaluated
    sums = {**before.per_sequence}
    sums["ce_spliced"] = [
        clean - 0.01 * n for clean, n in zip(sums["ce_clean"], sums["n_tokens"], strict=True)
    ]
    sums["ce_spliced"][0] += 1.0  # one sequence with a gap: some resamples are positive
    no_gap = dataclasses.replace(before, per_sequence=sums)
    intervals = paired_intervals(no_gap, {"tuned": tuned, "control": control}, control="control")
    assert intervals["fraction_ce_gap_closed"] == {"tuned": None, "control": None}
    assert intervals["difference_from_control"] == {"tuned": None}
    # with a gap, intervals as usual
    assert paired_intervals(before, {"tuned": tuned})["fraction_ce_gap_closed"]["tuned"] is not None
