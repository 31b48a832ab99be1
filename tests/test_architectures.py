"""Conversion between inference and training SAEs preserves behaviour, for every architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_sae
from sae_lens import SAE
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

from sae_lens_kl.architectures import (
    FINETUNABLE_INFERENCE,
    UnsupportedSAEError,
    to_inference_sae,
    to_training_sae,
)

X = torch.randn(40, 32, generator=torch.Generator().manual_seed(5))


def training_output(sae) -> torch.Tensor:
    return sae.decode(sae.encode(X))


@pytest.mark.parametrize("architecture", FINETUNABLE_INFERENCE)
def test_training_copy_reproduces_the_inference_sae(architecture: str) -> None:
    sae = make_sae(architecture)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    training = to_training_sae(sae)
    with torch.no_grad():
        expected = sae(X)
        assert (expected != 0).any()
        torch.testing.assert_close(training_output(training), expected, rtol=1e-6, atol=1e-6)
        # and back again
        torch.testing.assert_close(to_inference_sae(training)(X), expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in before.items()), "input SAE modified"
    assert type(to_inference_sae(training)) is type(sae)


def test_topk_decoder_norm_rescaling_is_preserved_both_ways() -> None:
    # A TopK inference SAE that rescales by decoder norm, and one that does not.
    for rescale in (True, False):
        sae = make_sae("topk", rescale_acts_by_decoder_norm=rescale)
        training = to_training_sae(sae)
        assert training.cfg.rescale_acts_by_decoder_norm is rescale
        with torch.no_grad():
            torch.testing.assert_close(training_output(training), sae(X), rtol=1e-5, atol=1e-5)
    # A TopK *training* SAE that rescales folds the norms when it becomes an inference SAE.
    training = make_sae("topk", training=True, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        torch.testing.assert_close(
            to_inference_sae(training)(X), training_output(training), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_training_saes_become_jumprelu(architecture: str) -> None:
    training = make_sae(architecture, training=True, k=4)
    with torch.no_grad():
        training.topk_threshold.fill_(0.2)
    copy = to_training_sae(training)
    assert copy is not training and type(copy) is type(training)
    inference = to_inference_sae(copy)
    assert inference.cfg.architecture() == "jumprelu"
    assert torch.allclose(inference.threshold, torch.full_like(inference.threshold, 0.2))


def test_pre_6_topk_config_loads_and_converts_without_changing_outputs(tmp_path) -> None:
    sae = make_sae("topk")
    sae.save_model(tmp_path)
    # Rewrite cfg.json the way SAELens < 6 wrote TopK SAEs: no architecture, no rescale flag.
    old = {
        "d_in": 32,
        "d_sae": 96,
        "dtype": "float32",
        "device": "cpu",
        "hook_point": "blocks.1.hook_resid_pre",
        "hook_point_layer": 1,
        "model_name": "tiny-test-model",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 8},
        "apply_b_dec_to_input": True,
        "context_size": 16,
        "normalize_activations": "none",
        "sae_lens_version": "5.3.0",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.architecture() == "topk"
    training = to_training_sae(loaded)
    assert training.cfg.rescale_acts_by_decoder_norm is False
    with torch.no_grad():
        torch.testing.assert_close(training_output(training), sae(X))


def test_inert_normalisation_is_not_re_estimated() -> None:
    # An SAE whose scaling factor was never folded computes its forward pass without scaling;
    # the training copy must too, instead of asking SAELens's trainer to estimate one.
    sae = make_sae("standard", normalize_activations="expected_average_only_in")
    training = to_training_sae(sae)
    assert training.cfg.normalize_activations == "none"
    with torch.no_grad():
        torch.testing.assert_close(training_output(training), sae(X))


def test_sparsity_coefficient_and_recorded_training_details() -> None:
    sae = make_sae("standard")
    sae.cfg.metadata.training_architecture = "standard"
    sae.cfg.metadata.training_architecture_details = {"l1_coefficient": 7.5, "l1_warm_up_steps": 0}
    assert to_training_sae(sae).cfg.l1_coefficient == 7.5
    assert to_training_sae(sae, sparsity_coefficient=2.0).cfg.l1_coefficient == 2.0


def test_unsupported_architectures_are_refused_with_a_clear_error() -> None:
    with pytest.raises(UnsupportedSAEError, match="'matching_pursuit'.*supported are .*'transcoder'"):
        to_training_sae(make_sae("matching_pursuit"))
    # transcoders (input hook -> output hook) are supported: tests/test_transcoders.py
    transcoder = Transcoder(TranscoderConfig(d_in=32, d_sae=64, d_out=32, apply_b_dec_to_input=False))
    assert type(to_inference_sae(to_training_sae(transcoder))) is Transcoder


def test_negative_jumprelu_thresholds_are_refused() -> None:
    sae = make_sae("jumprelu")
    with torch.no_grad():
        sae.threshold[0] = -0.1
    with pytest.raises(UnsupportedSAEError, match="negative thresholds"):
        to_training_sae(sae)
