"""Moving an SAE between its inference form and the SAELens training class that fine-tunes it.

The conversion preserves behaviour: before the first step the training SAE computes the same
reconstruction as the SAE the user passed, and the inference SAE we return computes the same
reconstruction as the trained one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sae_lens import SAE, TrainingSAE
from sae_lens.registry import get_sae_class, get_sae_training_class

from sae_lens_kl.config import TRAINING_ARCHITECTURES
from sae_lens_kl.transcoders import TRANSCODER_ARCHITECTURES, register_training_classes

# Inference architectures whose own training class reproduces their forward pass exactly
# (SAELens's for SAEs, transcoders.py's for transcoders).
FINETUNABLE_INFERENCE = ("standard", "gated", "topk", "abstopk", "jumprelu", *TRANSCODER_ARCHITECTURES)
# Training architectures accepted when the user passes a TrainingSAE (BatchTopK and Matryoshka
# load as JumpReLU inference SAEs).
FINETUNABLE_TRAINING = (*TRAINING_ARCHITECTURES, *TRANSCODER_ARCHITECTURES)
# Sparsity coefficient each architecture trains with (driven by the sparsity controller).
SPARSITY_COEFFICIENT = {
    "standard": "l1",
    "gated": "l1",
    "jumprelu": "l0",
    "transcoder": "l1",
    "skip_transcoder": "l1",
    "jumprelu_transcoder": "l0",
    "jumprelu_skip_transcoder": "l0",
}
# SAELens's trainer, checkpoints and conversions find the training transcoders in its registry.
register_training_classes()
# Normalisations with no run-time effect in an SAE's forward pass; SAELens's trainer would
# re-estimate them from (activation) data, so the training copy says "none" instead.
_INERT_NORMALISATIONS = ("expected_average_only_in", "covariance_whitening")


class UnsupportedSAEError(ValueError):
    pass


def check_supported(sae: SAE[Any]) -> None:
    arch = sae.cfg.architecture()
    allowed = FINETUNABLE_TRAINING if isinstance(sae, TrainingSAE) else FINETUNABLE_INFERENCE
    if arch not in allowed:
        raise UnsupportedSAEError(
            f"SAE architecture {arch!r} ({type(sae).__name__}) cannot be KL fine-tuned: supported "
            f"are {list(allowed)}"
            + (
                " (BatchTopK and Matryoshka SAEs load as 'jumprelu' inference SAEs and are "
                "fine-tuned as such; pass their TrainingSAE to keep batch-TopK training)."
                if not isinstance(sae, TrainingSAE)
                else "."
            )
        )


def to_training_sae(sae: SAE[Any], sparsity_coefficient: float | None = None) -> TrainingSAE[Any]:
    """A new TrainingSAE with the weights and behaviour of `sae` (which is left untouched)."""
    check_supported(sae)
    training = copy.deepcopy(sae) if isinstance(sae, TrainingSAE) else _training_from_inference(sae)
    if training.cfg.normalize_activations in _INERT_NORMALISATIONS:
        training.cfg.normalize_activations = "none"
    coefficient_field = {"l1": "l1_coefficient", "l0": "l0_coefficient"}.get(
        SPARSITY_COEFFICIENT.get(training.cfg.architecture(), ""), ""
    )
    if sparsity_coefficient is not None and coefficient_field:
        setattr(training.cfg, coefficient_field, float(sparsity_coefficient))
    return training


def _training_from_inference(sae: SAE[Any]) -> TrainingSAE[Any]:
    arch = sae.cfg.architecture()
    training_cls, training_cfg_cls = get_sae_training_class(arch)
    cfg_dict = sae.cfg.to_dict()
    metadata = cfg_dict.get("metadata", {})
    # SAELens records the training-only fields (l1 coefficient, aux loss weights, ...) of SAEs it
    # trained; reuse them when they describe this architecture.
    details = {}
    if metadata.get("training_architecture") == arch:
        details = dict(metadata.get("training_architecture_details") or {})
    merged = {**details, **cfg_dict}
    if arch in ("topk", "abstopk"):
        # The training config defaults this to True; the inference SAE's value is what its outputs
        # were computed with (pre-6.0 configs lack it and mean False).
        merged["rescale_acts_by_decoder_norm"] = bool(sae.cfg.rescale_acts_by_decoder_norm)
    if arch in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder") and bool(
        (sae.threshold < 0).any()
    ):
        raise UnsupportedSAEError(
            "This JumpReLU SAE has negative thresholds; SAELens's JumpReLU training keeps thresholds "
            ">= 0, which would change its outputs. Clamp them (sae.threshold.data.clamp_(min=0)) "
            "first if that is intended."
        )
    training_cfg = training_cfg_cls.from_dict(merged)
    target_device = training_cfg.device
    training_cfg.device = "meta"  # build without allocating, then load the real weights
    training = training_cls(training_cfg)
    training.cfg.device = target_device
    state = {name: tensor.detach().clone() for name, tensor in sae.state_dict().items()}
    training.process_state_dict_for_loading(state)
    training.load_state_dict(state, assign=True)
    training.to(device=target_device, dtype=sae.dtype)
    return training


def to_inference_sae(training: TrainingSAE[Any]) -> SAE[Any]:
    """The inference SAE SAELens would save for `training` (e.g. BatchTopK -> JumpReLU, TopK decoder
    norms folded), built in memory."""
    state = {name: tensor.detach().clone() for name, tensor in training.state_dict().items()}
    training.process_state_dict_for_saving_inference(state)
    cfg_dict = training.cfg.get_inference_sae_cfg_dict()
    sae_cls, sae_cfg_cls = get_sae_class(cfg_dict["architecture"])
    sae_cfg = sae_cfg_cls.from_dict(cfg_dict)
    target_device = sae_cfg.device
    sae_cfg.device = "meta"
    sae = sae_cls(sae_cfg)
    sae.cfg.device = target_device
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state, assign=True)
    return sae.to(device=target_device, dtype=training.dtype)


@contextmanager
def flat_activations(sae: SAE[Any]) -> Iterator[None]:
    """Temporarily turn off hook_z reshaping: our hook sites hand the SAE flattened heads."""
    reshaping = bool(getattr(sae, "hook_z_reshaping_mode", False))
    if reshaping:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        if reshaping:
            sae.turn_on_forward_pass_hook_z_reshaping()
