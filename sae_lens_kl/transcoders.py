"""Training classes for SAELens's transcoders, which SAELens 6.54 can load and splice but not train.

A transcoder reads the activation at one hook point (`metadata.hook_name`, e.g.
`blocks.L.ln2.hook_normalized`) and its output replaces the activation at another
(`metadata.hook_name_out`, e.g. `blocks.L.hook_mlp_out`). Each SAELens transcoder architecture gets
a `TrainingSAE` here, registered in SAELens's training registry under the same architecture name,
so SAELens's trainer, checkpoints (`TrainingSAE.load_from_disk`) and inference conversion work
unchanged: the sparsity losses are SAELens's (L1 as its standard SAE, L0 as its JumpReLU SAE), the
forward pass is the inference transcoder's, and the MSE is taken against the clean activation at
the output hook, which the step hands over as `TranscoderStepInput.target`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.transcoder import Transcoder
from torch import nn

TRANSCODER_ARCHITECTURES = (
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)


def is_transcoder(sae: SAE[Any]) -> bool:
    return sae.cfg.architecture() in TRANSCODER_ARCHITECTURES


@dataclass
class TranscoderStepInput(TrainStepInput):
    """SAELens's step input plus the clean activation at the output hook, [rows, d_out]."""

    target: torch.Tensor


@dataclass
class _OutputWidth:
    """The transcoder part of a training config (mixed in before SAELens's): the output hook's
    width, and no decoder bias subtracted from the input (it has the output's width)."""

    d_out: int = 768

    def __post_init__(self) -> None:
        if self.apply_b_dec_to_input:  # type: ignore[attr-defined]
            raise ValueError("apply_b_dec_to_input is not supported for transcoders")
        super().__post_init__()  # type: ignore[misc]


@dataclass
class TranscoderTrainingSAEConfig(_OutputWidth, StandardTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "transcoder"


@dataclass
class SkipTranscoderTrainingSAEConfig(TranscoderTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "skip_transcoder"


@dataclass
class JumpReLUTranscoderTrainingSAEConfig(_OutputWidth, JumpReLUTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_transcoder"


@dataclass
class JumpReLUSkipTranscoderTrainingSAEConfig(JumpReLUTranscoderTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_skip_transcoder"


class _TranscoderTraining(TrainingSAE[Any]):
    """What every training transcoder changes in its SAELens base class: a decoder into the output
    hook's width, no decoder bias subtracted from the input, and the MSE against the output hook's
    clean activation. Mixed in before StandardTrainingSAE or JumpReLUTrainingSAE."""

    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()
        d_out, d_sae = self.cfg.d_out, self.cfg.d_sae
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out, dtype=self.dtype, device=self.device))
        nn.init.kaiming_uniform_(self.W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=self.dtype, device=self.device))

    # The inference transcoder's input processing and decoder (sae-lens 6.54 Transcoder), so the
    # training copy computes exactly what the inference one does.
    process_sae_in = Transcoder.process_sae_in
    decode = Transcoder.decode

    def skip(self, sae_in: torch.Tensor) -> torch.Tensor | None:  # noqa: ARG002 (overridden)
        """The skip connection's contribution to the output (None: no skip connection)."""
        return None

    def prepare_step(self) -> None:
        """Before each training step (JumpReLU: keep thresholds >= 0, as SAELens does)."""

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        # TrainingSAE.training_forward_pass with the MSE against the output hook's activation
        # instead of the input (sae-lens 6.54 has no target seam).
        if not isinstance(step_input, TranscoderStepInput):
            raise TypeError(
                "A transcoder's training step needs the clean activation at its output hook: pass "
                "a TranscoderStepInput (kl_finetune builds one)."
            )
        self.prepare_step()
        feature_acts, hidden_pre = self.encode_with_hidden_pre(step_input.sae_in)
        sae_out = self.decode(feature_acts)
        skip = self.skip(step_input.sae_in)
        if skip is not None:
            sae_out = sae_out + skip
        mse_loss = self.mse_loss_fn(sae_out, step_input.target.to(sae_out.dtype)).sum(dim=-1).mean()
        aux_losses = self.calculate_aux_loss(
            step_input=step_input, feature_acts=feature_acts, hidden_pre=hidden_pre, sae_out=sae_out
        )
        losses = {"mse_loss": mse_loss, **aux_losses}
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values(), torch.zeros((), device=mse_loss.device)),
            losses=losses,
        )


class _Skip(_TranscoderTraining):
    """The skip connection of SAELens's SkipTranscoder: + x @ W_skip.T, zero-initialised."""

    W_skip: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.W_skip = nn.Parameter(
            torch.zeros(self.cfg.d_out, self.cfg.d_in, dtype=self.dtype, device=self.device)
        )

    def skip(self, sae_in: torch.Tensor) -> torch.Tensor | None:
        return sae_in.to(self.dtype) @ self.W_skip.T


class TranscoderTrainingSAE(_TranscoderTraining, StandardTrainingSAE):
    """Trains SAELens's `Transcoder` (ReLU; L1 penalty as SAELens's standard SAE)."""


class SkipTranscoderTrainingSAE(_Skip, StandardTrainingSAE):
    """Trains SAELens's `SkipTranscoder`."""


class JumpReLUTranscoderTrainingSAE(_TranscoderTraining, JumpReLUTrainingSAE):
    """Trains SAELens's `JumpReLUTranscoder` (L0 penalty and straight-through threshold gradients
    as SAELens's JumpReLU SAE)."""

    def prepare_step(self) -> None:
        # as JumpReLUTrainingSAE.training_forward_pass does before its step (sae-lens 6.54)
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)


class JumpReLUSkipTranscoderTrainingSAE(_Skip, JumpReLUTranscoderTrainingSAE):
    """Trains SAELens's `JumpReLUSkipTranscoder`."""


TRAINING_CLASSES: dict[str, tuple[type[TrainingSAE[Any]], type[Any]]] = {
    "transcoder": (TranscoderTrainingSAE, TranscoderTrainingSAEConfig),
    "skip_transcoder": (SkipTranscoderTrainingSAE, SkipTranscoderTrainingSAEConfig),
    "jumprelu_transcoder": (JumpReLUTranscoderTrainingSAE, JumpReLUTranscoderTrainingSAEConfig),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoderTrainingSAE, JumpReLUSkipTranscoderTrainingSAEConfig),
}


def register_training_classes() -> None:
    """Add the training transcoders to SAELens's registry (its extension seam), once; an
    architecture SAELens itself can train one day keeps SAELens's class."""
    for architecture, (training_cls, cfg_cls) in TRAINING_CLASSES.items():
        if architecture not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(architecture, training_cls, cfg_cls)


def reconstruct(sae: SAE[Any], acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the SAE's output replaces the activation with, its latent activations) for input acts;
    a skip transcoder's output includes its skip connection."""
    if isinstance(sae, Transcoder):
        return sae.forward_with_activations(acts)
    feature_acts = sae.encode(acts)
    return sae.decode(feature_acts), feature_acts
