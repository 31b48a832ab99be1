"""Paired bootstrap intervals over held-out sequences for the fraction of the CE gap closed.

Every evaluation of one `HeldOutEvaluator` covers the same sequences, so the SAE before a
fine-tune, after it, and after a control are paired: a resample draws sequences (with
replacement) once and recomputes every quantity on that draw. The CE gap is a ratio of sums over
the drawn sequences' positions, (Σ ce_spliced − Σ ce_clean) / Σ n, as the point estimate is over
all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sae_lens_kl.evaluation import EvalResult

N_RESAMPLES = 2000
LEVEL = 0.95


def fraction_closed(before: EvalResult, after: EvalResult) -> float | None:
    """(gap before − gap after) / gap before; None when the starting gap is ≤ 0 (the SAE already
    predicts as well as the model: there is no gap to close, and the ratio means nothing)."""
    if before.ce_gap <= 0:
        return None
    return (before.ce_gap - after.ce_gap) / before.ce_gap


def undefined_reason(before: EvalResult) -> str | None:
    """Why the fraction of the gap closed is undefined for this starting SAE, or None."""
    if before.ce_gap <= 0:
        return (
            f"undefined: the starting CE gap is {before.ce_gap:.4g} ≤ 0 (the spliced model is no worse "
            "than the clean one on these tokens), so there is no gap to close"
        )
    return None


def paired_intervals(
    before: EvalResult,
    afters: Mapping[str, EvalResult],
    *,
    control: str | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """95 % percentile intervals of each run's fraction of the CE gap closed, and, with `control`
    (a key of `afters`), of each other run's difference from it, from one set of paired resamples
    of the held-out sequences. Resamples whose starting gap is ≤ 0 count as undefined and are
    reported (`undefined_resamples`); the interval is over the rest."""
    sequences = _per_sequence(before)
    if len(sequences["n_tokens"]) < 2:
        raise ValueError(
            f"A bootstrap over held-out sequences needs at least 2 of them; this evaluation has "
            f"{len(sequences['n_tokens'])}. Evaluate on more tokens (eval_tokens)."
        )
    runs = {name: _per_sequence(after) for name, after in afters.items()}
    for name, after in runs.items():
        if not (
            torch.equal(after["n_tokens"], sequences["n_tokens"])
            and torch.equal(after["ce_clean"], sequences["ce_clean"])
        ):
            raise ValueError(
                f"{name!r} was evaluated on other sequences than the starting SAE; evaluate every run "
                "with one HeldOutEvaluator so that they are paired."
            )
    if control is not None and control not in runs:
        raise ValueError(f"control={control!r} is not one of the runs {sorted(runs)}.")
    generator = torch.Generator().manual_seed(seed)
    n = len(sequences["n_tokens"])
    # counts[b, i]: how often resample b drew sequence i; sums over a draw are counts @ values
    draws = torch.randint(0, n, (n_resamples, n), generator=generator)
    counts = torch.zeros(n_resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_resamples, n, dtype=torch.float64)
    )

    def gap(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return counts @ (values["ce_spliced"] - values["ce_clean"]) / (counts @ values["n_tokens"])

    gap_before = gap(sequences)
    defined = gap_before > 0
    fractions = {name: (gap_before - gap(values)) / gap_before for name, values in runs.items()}
    result: dict[str, Any] = {
        "level": LEVEL,
        "n_resamples": n_resamples,
        "n_sequences": n,
        "undefined_resamples": int((~defined).sum()),
        "fraction_ce_gap_closed": {name: _interval(f[defined]) for name, f in fractions.items()},
    }
    if control is not None:
        result["control"] = control
        result["difference_from_control"] = {
            name: _interval((f - fractions[control])[defined])
            for name, f in fractions.items()
            if name != control
        }
    return result


def format_interval(interval: list[float] | None) -> str:
    """An interval of fractions as signed percentages, "[+20.8%, +27.1%]" ("—" when undefined)."""
    return "—" if interval is None else f"[{interval[0]:+.1%}, {interval[1]:+.1%}]"


def _interval(samples: torch.Tensor) -> list[float] | None:
    if samples.numel() == 0:
        return None
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=samples.dtype)).tolist()
    return [low, high]


def _per_sequence(result: EvalResult) -> dict[str, torch.Tensor]:
    if not result.per_sequence:
        raise ValueError(
            "This EvalResult holds no per-sequence sums (an evaluation from an older version, or read "
            "back from JSON); evaluate again with a HeldOutEvaluator."
        )
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in result.per_sequence.items()}
