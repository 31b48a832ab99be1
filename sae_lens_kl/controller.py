"""The L0 controller of Karvonen 2025, App. E: hold an SAE's L0 at a target during the fine-tune."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sae_lens.training.optim import CoefficientScheduler


@dataclass
class SparsityController:
    """Each step: coefficient *= (1 - rate) if L0 < target else (1 + rate).

    Acts on the SAELens trainer's coefficient scheduler (`l1` for standard/gated SAEs, `l0` for
    JumpReLU), so the SAE's own sparsity loss reads the controlled value.
    """

    coefficient_name: str
    rate: float
    target_l0: float | None = None
    """None: the L0 of the first batch, measured before any update."""

    def update(self, scheduler: CoefficientScheduler, l0: float) -> None:
        if self.target_l0 is None:
            self.target_l0 = l0
        factor = (1 - self.rate) if l0 < self.target_l0 else (1 + self.rate)
        # The scheduler recomputes its current value from final_value on every step (warm-up),
        # so scale both.
        scheduler.final_value *= factor
        scheduler.current_value *= factor

    def state_dict(self, scheduler: CoefficientScheduler) -> dict[str, Any]:
        return {**asdict(self), "coefficient": scheduler.final_value}

    def load_state_dict(self, state: dict[str, Any], scheduler: CoefficientScheduler) -> None:
        self.target_l0 = state["target_l0"]
        # SAELens saves only the scheduler's step count, not the value this controller moved.
        scheduler.final_value = state["coefficient"]
        scheduler.load_state_dict({"current_step": scheduler.current_step})
