"""Paired bootstrap intervals over held-out sequences for the fraction of the CE gap closed.

Every evaluation of one `HeldOutEvaluator` covers the same sequences, so the SAE before a
fine-tune, after it, and after a control are paired: a resample draws sequences (with
replacement) once and recomputes every quantity on that draw. The CE gap is a ratio of sums over
the drawn sequences' positions, (Σ ce_spliced − Σ ce_clean) / Σ n, as the point estimate is over
all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sae_lens_kl.eval_result import EvalResult

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
    afters: Mapping[str, EvalResult | Sequence[EvalResult]],
    *,
    control: str | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """95 % percentile intervals of each run's fraction of the CE gap closed, and, with `control`
    (a key of `afters`), of each other run's difference from it, from one set of paired resamples
    of the held-out sequences. Resamples whose starting gap is ≤ 0 count as undefined and are
    reported (`undefined_resamples`); the interval is over the rest. When the starting SAE's own
    gap is ≤ 0 every interval is None (the fraction itself is undefined).

    A run given as a sequence of results is one result per seed (runs of the same seed index paired:
    the same training tokens and initialisation): its fraction is the mean over the seeds, and every
    resample also draws the seeds with replacement (one draw shared by all runs), so the interval
    covers the spread over seeds as well as over held-out sequences. With few seeds that bootstrap
    understates the spread over seeds (its variance by a factor (N − 1) / N)."""
    sequences = _per_sequence(before)
    if len(sequences["n_tokens"]) < 2:
        raise ValueError(
            f"A bootstrap over held-out sequences needs at least 2 of them; this evaluation has "
            f"{len(sequences['n_tokens'])}. Evaluate on more tokens (eval_tokens)."
        )
    runs = {
        name: [_per_sequence(one) for one in ([after] if isinstance(after, EvalResult) else after)]
        for name, after in afters.items()
    }
    for name, seeds in runs.items():
        for after in seeds:
            if not (
                torch.equal(after["n_tokens"], sequences["n_tokens"])
                and torch.equal(after["ce_clean"], sequences["ce_clean"])
            ):
                raise ValueError(
                    f"{name!r} was evaluated on other sequences than the starting SAE; evaluate every "
                    "run with one HeldOutEvaluator so that they are paired."
                )
    seed_counts = {name: len(seeds) for name, seeds in runs.items()}
    n_seeds = max(seed_counts.values(), default=1)
    if any(count == 0 or count not in (1, n_seeds) for count in seed_counts.values()):
        raise ValueError(
            f"Runs with different numbers of seeds ({seed_counts}) cannot be paired by seed; give "
            "every run one result per seed (or one result)."
        )
    if control is not None and control not in runs:
        raise ValueError(f"control={control!r} is not one of the runs {sorted(runs)}.")
    generator = torch.Generator().manual_seed(seed)
    n = len(sequences["n_tokens"])
    # counts[b, i]: how often resample b drew sequence i; sums over a draw are counts @ values
    counts = draw_counts(n_resamples, n, generator)
    # seed_weights[b, s]: the share of seed s in resample b's mean over seeds
    seed_weights = draw_counts(n_resamples, n_seeds, generator) / n_seeds

    def gap(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return counts @ (values["ce_spliced"] - values["ce_clean"]) / (counts @ values["n_tokens"])

    gap_before = gap(sequences)
    # where the starting SAE's own gap is <= 0 the fraction is undefined, and so is any interval
    # of it (resamples that happen to draw a positive gap would describe another SAE)
    whole_gap = (sequences["ce_spliced"] - sequences["ce_clean"]).sum() / sequences["n_tokens"].sum()
    defined = gap_before > 0 if whole_gap > 0 else torch.zeros_like(gap_before, dtype=torch.bool)
    fractions = {}
    for name, seeds in runs.items():
        per_seed = torch.stack([(gap_before - gap(values)) / gap_before for values in seeds], dim=1)
        fractions[name] = (per_seed * seed_weights).sum(1) if len(seeds) > 1 else per_seed[:, 0]
    result: dict[str, Any] = {
        "level": LEVEL,
        "n_resamples": n_resamples,
        "n_sequences": n,
        "n_seeds": n_seeds,
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


def draw_counts(n_resamples: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n_resamples, n]: how often each resample (n draws with replacement) drew each item."""
    draws = torch.randint(0, n, (n_resamples, n), generator=generator)
    return torch.zeros(n_resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_resamples, n, dtype=torch.float64)
    )


def mean_fraction_closed(before: EvalResult, afters: Sequence[EvalResult]) -> float | None:
    """The mean over seeds of the fraction of the CE gap closed (None when it is undefined)."""
    values = [fraction_closed(before, after) for after in afters]
    return None if None in values else sum(values) / len(values)  # type: ignore[arg-type]


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


def error_bars(values: Sequence[float], intervals: Sequence[list[float] | None]) -> list[list[float]]:
    """matplotlib's asymmetric `yerr` for point estimates and their intervals: none where an
    interval is undefined, and clipped at 0 where a percentile interval of a ratio excludes its
    point estimate (matplotlib refuses negative errors)."""
    bounds = [interval or [value, value] for value, interval in zip(values, intervals, strict=True)]
    return [
        [max(0.0, value - low) for value, (low, _) in zip(values, bounds, strict=True)],
        [max(0.0, high - value) for value, (_, high) in zip(values, bounds, strict=True)],
    ]
