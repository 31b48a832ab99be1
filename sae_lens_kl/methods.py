"""What trains in a fine-tune, as one object the run composes: the SAE itself (default), LoRA on
the SAE, an adapter after the frozen SAE, or LoRA on the LM's blocks (paper App. C, D; Chen et
al. 2025). A method prepares the training SAE and names the modules that train beside it (new,
or from the checkpoint a run resumes), the hooks its spliced pass adds, whether that pass runs
from the embedding, and how the trained SAE becomes the returned inference SAE. `api.py` asks
it; nothing else branches on which method runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.adapters import Adapter, load_adapter
from sae_lens_kl.architectures import to_inference_sae
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.lm_lora import Hook, LMLoRA, lm_lora_targets, load_lm_lora
from sae_lens_kl.lora import add_lora, check_rank, merge_lora


class TrainedModule(Protocol):
    """A module trained beside the SAE (an adapter after it, LoRA on the LM): its parameters join
    the optimizer, and each checkpoint holds it as `filename`."""

    filename: str

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def save(self, path: Path) -> None: ...


class Replacement(Protocol):
    """What replaces the activation at the hook during a training step: given the SAE and its
    clean input rows (with SAELens's step state), a TrainStepOutput whose `sae_out` is spliced in
    and whose `losses` hold the SAE's own terms (`mse_loss` and its sparsity/auxiliary losses)."""

    def __call__(self, sae: TrainingSAE[Any], step_input: TrainStepInput) -> TrainStepOutput: ...


def sae_reconstruction(sae: TrainingSAE[Any], step_input: TrainStepInput) -> TrainStepOutput:
    """The SAE's own training forward pass: its reconstruction, with its aux-k, L1, L0, gated or
    Matryoshka losses as SAELens computes them."""
    return sae.training_forward_pass(step_input)


class Method(Protocol):
    """A way of training what replaces the activation."""

    trains_sae: bool
    """Whether the SAE's own weights train (an L0 controller then drives its coefficient)."""
    spliced_from_start: bool
    """The spliced pass runs from the embedding (the method changes the SAE's input)."""

    def check(self, sae: SAE[Any], *, resumed: bool, saved: bool) -> None:
        """Refuse, before any work, settings this method cannot train with (`resumed`: a run
        resumed from a checkpoint; `saved`: the run has a save_dir)."""
        ...

    def start(self, sae: TrainingSAE[Any], checkpoint: Path | None) -> list[TrainedModule]:
        """Prepare `sae` for training (freeze it, parametrize it) and return the modules that
        train beside it: new, or as saved in `checkpoint` when resuming."""
        ...

    def spliced_hooks(self) -> list[Hook]:
        """Hooks the spliced pass (training and evaluation) adds to the model's."""
        ...

    def result(self, sae: TrainingSAE[Any]) -> SAE[Any]:
        """The inference SAE of the trained `sae`, carrying whatever the method trained."""
        ...


@dataclass
class SAEFinetune:
    """The paper's method: every SAE parameter trains."""

    trains_sae: bool = True
    spliced_from_start: bool = False

    def check(self, sae: SAE[Any], *, resumed: bool, saved: bool) -> None:
        pass

    def start(self, sae: TrainingSAE[Any], checkpoint: Path | None) -> list[TrainedModule]:  # noqa: ARG002
        return []

    def spliced_hooks(self) -> list[Hook]:
        return []

    def result(self, sae: TrainingSAE[Any]) -> SAE[Any]:
        return to_inference_sae(sae)


@dataclass
class SAELoRA(SAEFinetune):
    """A rank-r update of the encoder and decoder (App. D), merged into the weights at the end:
    the result is a plain SAE of the same architecture. (Resume is refused for it in plan.py.)"""

    rank: int = 1
    alpha: float = 32.0
    seed: int = 0

    def check(self, sae: SAE[Any], *, resumed: bool, saved: bool) -> None:  # noqa: ARG002
        check_rank(self.rank, sae.cfg.d_in, sae.cfg.d_sae)
        if resumed:
            raise ValueError(
                "resume_from with sae_lora_rank is not supported yet (checkpoints hold the unmerged "
                "factors); rerun the LoRA fine-tune from the start."
            )

    def start(self, sae: TrainingSAE[Any], checkpoint: Path | None) -> list[TrainedModule]:  # noqa: ARG002
        add_lora(sae, self.rank, self.alpha, self.seed)
        return []

    def result(self, sae: TrainingSAE[Any]) -> SAE[Any]:
        merge_lora(sae)
        return to_inference_sae(sae)


@dataclass
class AdapterAfterSAE:
    """An adapter on the frozen SAE's reconstruction (App. C); the returned SAE carries it as a
    permanent hook, and it is saved beside the SAE."""

    kind: str
    width: int
    seed: int = 0
    trains_sae: bool = False
    spliced_from_start: bool = False
    adapter: Adapter | None = field(default=None, init=False)

    def check(self, sae: SAE[Any], *, resumed: bool, saved: bool) -> None:  # noqa: ARG002
        if self.kind == "linear" and self.width >= sae.cfg.d_in:
            raise ValueError(
                f"adapter_width={self.width} must be below the SAE's d_in ({sae.cfg.d_in}) for the "
                "linear adapter, or it is no low-rank map; use a smaller width or adapter='mlp'."
            )

    def start(self, sae: TrainingSAE[Any], checkpoint: Path | None) -> list[TrainedModule]:
        sae.requires_grad_(False)
        if checkpoint is not None:
            self.adapter = load_adapter(checkpoint, sae)
        else:
            adapter = Adapter(self.kind, sae.cfg.d_in, self.width, seed=self.seed)
            self.adapter = adapter.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype).attach(sae)
        return [self.adapter]

    def spliced_hooks(self) -> list[Hook]:
        return []

    def result(self, sae: TrainingSAE[Any]) -> SAE[Any]:
        assert self.adapter is not None
        tuned = to_inference_sae(sae)
        self.adapter.detach(sae)  # the returned SAE carries the adapter, as the trained one did
        self.adapter.attach(tuned)
        return tuned


@dataclass
class LMLoRAAfterSAE:
    """LoRA on the LM's blocks (after the SAE's hook, or all), the SAE frozen: the updates act
    through hook points of the spliced pass only, and are saved as their own artifact."""

    model: HookedRootModule
    hook_name: str
    rank: int
    layers: str = "after"
    seed: int = 0
    trains_sae: bool = False
    lora: LMLoRA | None = field(default=None, init=False)

    @property
    def spliced_from_start(self) -> bool:
        # LoRA before the SAE changes its input: the spliced pass runs from the embedding
        return self.layers == "all"

    def check(self, sae: SAE[Any], *, resumed: bool, saved: bool) -> None:  # noqa: ARG002
        if not isinstance(self.model, HookedTransformer):
            raise ValueError(
                "lm_lora_rank needs a HookedTransformer: its hook points carry the LoRA updates."
            )
        if not saved:
            raise ValueError(
                "lm_lora_rank needs save_dir: the LoRA is its own artifact (save_dir/lm_lora.safetensors; "
                "kl_finetune returns the SAE, unchanged)."
            )
        # refuses an SAE after the last block (for layers='after')
        targets = lm_lora_targets(self.model, self.hook_name, self.layers)
        smallest = min(min(t.in_features, t.out_features) for t in targets)
        if self.rank >= smallest:
            raise ValueError(
                f"lm_lora_rank={self.rank} must be below {smallest}, the smallest dimension of "
                "the weights it adapts, or it is no low-rank update."
            )

    def start(self, sae: TrainingSAE[Any], checkpoint: Path | None) -> list[TrainedModule]:
        sae.requires_grad_(False)
        model = self.model
        assert isinstance(model, HookedTransformer)  # make_plan checked
        if checkpoint is not None:
            self.lora = load_lm_lora(checkpoint, model)
        else:
            targets = lm_lora_targets(model, self.hook_name, self.layers)
            lora = LMLoRA(targets, self.rank, model_name=model.cfg.model_name, seed=self.seed)
            self.lora = lora.to(next(model.parameters()).device)
        return [self.lora]

    def spliced_hooks(self) -> list[Hook]:
        assert self.lora is not None
        return self.lora.hooks()

    def result(self, sae: TrainingSAE[Any]) -> SAE[Any]:
        return to_inference_sae(sae)


MethodBuilder = Callable[[KLFinetuneConfig, HookedRootModule, str], Method]


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: how to build it from a config (with the model and the SAE's hook),
    and which of its options imply it when `method='auto'` (None: only chosen by name)."""

    build: MethodBuilder
    implied_by: Callable[[KLFinetuneConfig], bool] | None = None


def _sae(cfg: KLFinetuneConfig, model: HookedRootModule, hook: str) -> Method:  # noqa: ARG001
    return SAEFinetune()


def _sae_lora(cfg: KLFinetuneConfig, model: HookedRootModule, hook: str) -> Method:  # noqa: ARG001
    return SAELoRA(rank=cfg.sae_lora_rank, alpha=cfg.sae_lora_alpha, seed=cfg.init_seed)  # type: ignore[arg-type]


def _adapter(cfg: KLFinetuneConfig, model: HookedRootModule, hook: str) -> Method:  # noqa: ARG001
    return AdapterAfterSAE(cfg.adapter, cfg.adapter_width, seed=cfg.init_seed)  # type: ignore[arg-type]


def _lm_lora(cfg: KLFinetuneConfig, model: HookedRootModule, hook: str) -> Method:
    return LMLoRAAfterSAE(model, hook, cfg.lm_lora_rank, cfg.lm_lora_layers, seed=cfg.init_seed)  # type: ignore[arg-type]


# `method=` names (config.KLFinetuneConfig.method); a new method is one module with its class
# and builder and one entry here (tests/test_methods.py registers a toy one).
METHODS: dict[str, MethodEntry] = {
    "sae": MethodEntry(_sae),
    "sae_lora": MethodEntry(_sae_lora, implied_by=lambda cfg: cfg.sae_lora_rank is not None),
    "adapter": MethodEntry(_adapter, implied_by=lambda cfg: cfg.adapter is not None),
    "lm_lora": MethodEntry(_lm_lora, implied_by=lambda cfg: cfg.lm_lora_rank is not None),
}


def method_of(cfg: KLFinetuneConfig, model: HookedRootModule, hook_name: str) -> Method:
    """The method a config names: `method`, or with 'auto' the one its options imply (config.py
    allows one at a time), else the SAE fine-tune."""
    implied = [name for name, entry in METHODS.items() if entry.implied_by and entry.implied_by(cfg)]
    name = cfg.method if cfg.method != "auto" else (implied[0] if implied else "sae")
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {sorted(METHODS)} (or 'auto').")
    if implied not in ([], [name]) or (METHODS[name].implied_by is not None and not implied):
        raise ValueError(
            f"method={name!r} with the options of {implied or 'no method'}: set the options of the "
            "method you name (e.g. adapter= for 'adapter'), or method='auto'."
        )
    return METHODS[name].build(cfg, model, hook_name)
