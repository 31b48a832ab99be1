"""The k-latent TopK step (sae_lens_kl.sparse_topk) against SAELens's own dense TopK training SAEs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import make_sae
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE

from sae_lens_kl.architectures import to_inference_sae
from sae_lens_kl.sparse_topk import base_class, use_sparse_topk

TOPK_ARCHITECTURES = ["topk", "abstopk", "batchtopk", "matryoshka_batchtopk"]
ROWS, D_SAE = 40, 96


def _step(sae: TopKTrainingSAE, x: torch.Tensor, dead: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output of a training forward pass and every gradient of its loss (plus a fixed
    random projection of the reconstruction, standing in for the KL's gradient)."""
    sae.zero_grad()
    x = x.clone().requires_grad_(True)
    step = TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    out = sae.training_forward_pass(step)
    probe = torch.randn(out.sae_out.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    (out.loss + (out.sae_out * probe).sum()).backward()
    acts = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
    values = {"sae_out": out.sae_out.detach(), "feature_acts": acts.detach(), "x.grad": x.grad}
    values |= {f"loss {name}": loss.detach() for name, loss in out.losses.items()}
    values |= {f"{name}.grad": p.grad for name, p in sae.named_parameters() if p.grad is not None}
    return values


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("architecture", TOPK_ARCHITECTURES)
def test_outputs_and_gradients_equal_saelens_dense_path(architecture: str, rescale: bool) -> None:
    # float64: the two paths sum the same products in another order, so they agree to a few ulps
    # of float64 times the number of summed terms (<= ROWS); 1e-10 relative leaves 1e4x margin.
    fields: dict[str, Any] = {"apply_b_dec_to_input": True, "dtype": "float64"}
    if rescale:
        fields["rescale_acts_by_decoder_norm"] = True
    dense = make_sae(architecture, training=True, d_sae=D_SAE, **fields)
    assert isinstance(dense, TopKTrainingSAE)
    dense.double()
    sparse = copy.deepcopy(dense)
    use_sparse_topk(sparse, True)
    assert type(sparse) is not type(dense) and isinstance(sparse, type(dense))
    x = torch.randn(ROWS, dense.cfg.d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # the aux-k loss's dead latents add their own entries to the gradient
    expected, got = _step(dense, x, dead), _step(sparse, x, dead)
    assert expected.keys() == got.keys()
    assert {"W_enc.grad", "b_enc.grad", "W_dec.grad", "b_dec.grad", "x.grad"} <= got.keys()
    for name, value in expected.items():
        scale = value.abs().max().clamp_min(1e-300)
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10 * float(scale), msg=name)
    assert float(expected["loss auxiliary_reconstruction_loss"]) > 0


def test_switching_back_restores_saelens_class_and_inference_sae() -> None:
    training = make_sae("topk", training=True, rescale_acts_by_decoder_norm=False)
    original = type(training)
    use_sparse_topk(training, True)
    assert base_class(training) is original
    assert training.cfg.use_sparse_activations
    inference = to_inference_sae(training)
    assert type(inference).__module__.startswith("sae_lens")
    use_sparse_topk(training, False)
    assert type(training) is original and not training.cfg.use_sparse_activations


def test_other_architectures_untouched() -> None:
    training = make_sae("standard", training=True)
    original = type(training)
    use_sparse_topk(training, True)
    assert type(training) is original
