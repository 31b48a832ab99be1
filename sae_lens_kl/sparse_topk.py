"""A TopK SAE's training step at the cost of its k chosen latents.

SAELens 6.54's TopK training SAEs (topk, abstopk, batchtopk, matryoshka_batchtopk) compute the
encoder as a dense product, so its backward is two dense products with a [rows, d_sae] gradient
that is zero everywhere but at the chosen latents (and the aux-k loss's dead ones). Here the same
pre-activations get a backward that reads only those entries (sparse x dense products: the
encoder's weight gradient from the chosen columns, the input's from the chosen rows of W_enc^T),
and with SAELens's sparse activations (`use_sparse_activations`, COO latents) the decoder is an
`embedding_bag` over the chosen rows of W_dec, forward and backward. Outputs and gradients equal
SAELens's dense path up to float summation order (tests/test_sparse_topk.py, float64).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens import TrainingSAE
from sae_lens.saes.topk_sae import TopK, TopKTrainingSAE
from torch.nn.utils.parametrize import is_parametrized


class _SelectedLatentsLinear(torch.autograd.Function):
    """sae_in @ W_enc + b_enc, whose backward uses only the nonzero entries of its gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(sae_in, W_enc)
        return sae_in @ W_enc + b_enc  # SAELens's expression, so the forward is bit-identical

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        sae_in, W_enc = ctx.saved_tensors
        d_in, d_sae = W_enc.shape
        flat_grad = grad.reshape(-1, d_sae)
        flat_in = sae_in.reshape(-1, d_in)
        if flat_grad.dtype not in (torch.float32, torch.float64):
            # the sparse products are tested (float64) and measured (float32) only for these
            # dtypes; bfloat16/half SAEs keep SAELens's dense products
            grad_in = grad @ W_enc.T if ctx.needs_input_grad[0] else None
            grad_W = flat_in.T @ flat_grad if ctx.needs_input_grad[1] else None
            return grad_in, grad_W, flat_grad.sum(0) if ctx.needs_input_grad[2] else None
        # nonzero() lists the entries row by row: a [rows, d_sae] CSR matrix with these row offsets
        rows, latents = flat_grad.nonzero(as_tuple=True)
        values = flat_grad[rows, latents]
        offsets = torch.searchsorted(rows, torch.arange(len(flat_grad) + 1, device=rows.device))
        grad_in = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:  # each row: its chosen columns of W_enc, weighted
            grad_in = F.embedding_bag(
                latents, W_enc.T.contiguous(), offsets[:-1], mode="sum", per_sample_weights=values
            ).view_as(sae_in)
        if ctx.needs_input_grad[1]:  # dense x sparse: only the chosen columns are summed into
            if flat_grad.device.type == "cpu":
                # dense x CSR writes W_enc's [d_in, d_sae] layout; dense x COO returned its
                # transpose, which the gradient's accumulation then copied
                # (docs/performance.md, kernel choices)
                chosen = torch.sparse_csr_tensor(offsets, latents, values, flat_grad.shape)
                grad_W = flat_in.T.contiguous() @ chosen
            else:
                chosen = torch.sparse_coo_tensor(
                    torch.stack([rows, latents]),
                    values,
                    flat_grad.shape,
                    is_coalesced=True,
                    check_invariants=False,
                )
                grad_W = torch.mm(flat_in.T, chosen)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=values.dtype, device=values.device).index_add_(
                0, latents, values
            )
        return grad_in, grad_W, grad_b


class _SelectedLatentsBackward:
    """Mixed in before a TopK training SAE's class: its encoder through `_SelectedLatentsLinear`."""

    def encode_with_hidden_pre(self: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # TopKTrainingSAE.encode_with_hidden_pre of sae-lens 6.54 with the product swapped; the
        # test against SAELens's own class catches a release that changes it.
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(_SelectedLatentsLinear.apply(sae_in, self.W_enc, self.b_enc))
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        feature_acts = self.hook_sae_acts_post(self.activation_fn(hidden_pre))
        return feature_acts, hidden_pre

    def decode(self: Any, feature_acts: torch.Tensor) -> torch.Tensor:
        # TopKTrainingSAE.decode of sae-lens 6.54 with the product from the chosen decoder rows
        # (embedding_bag, whose backward reads only those rows); torch.sparse.mm's backward forms
        # the dense [rows, d_sae] product with W_dec^T and then masks it.
        if not feature_acts.is_sparse or feature_acts.ndim != 2 or self.cfg.rescale_acts_by_decoder_norm:
            return super().decode(feature_acts)
        chosen = feature_acts.coalesce()  # row by row
        rows, latents = chosen.indices()
        offsets = torch.searchsorted(rows, torch.arange(chosen.shape[0], device=rows.device))
        recons = F.embedding_bag(latents, self.W_dec, offsets, mode="sum", per_sample_weights=chosen.values())
        sae_out_pre = self.hook_sae_recons(recons + self.b_dec)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)


@functools.cache
def _selected_latents_class(cls: type[TopKTrainingSAE]) -> type[TopKTrainingSAE]:
    return type(cls.__name__, (_SelectedLatentsBackward, cls), {"__module__": cls.__module__})


def base_class(sae: TrainingSAE[Any]) -> type[TrainingSAE[Any]]:
    """The SAELens class of `sae`, with the sparse backward (if switched on) taken off."""
    cls = type(sae)
    return cls.__bases__[1] if issubclass(cls, _SelectedLatentsBackward) else cls


def use_sparse_topk(sae: TrainingSAE[Any], enabled: bool) -> None:
    """Switch a TopK training SAE to (or from) the k-latent step: SAELens's sparse activations
    (TopK's COO latents) with the decoder and encoder above. Other SAEs are left untouched."""
    if not isinstance(sae, TopKTrainingSAE):
        return
    # torch's parametrizations (LoRA on the SAE) swap the class themselves and undo it by name:
    # such an SAE keeps SAELens's encoder and decoder
    if not is_parametrized(sae):
        sae.__class__ = _selected_latents_class(base_class(sae)) if enabled else base_class(sae)
    # With decoder-norm rescaling SAELens's sparse activations fail in backward ('aten::view' on
    # SparseCPU, sae-lens 6.54.12 / torch 2.13): those SAEs keep dense activations.
    rescales = bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
    if type(sae.activation_fn) is TopK and not rescales:
        sae.cfg.use_sparse_activations = enabled
        sae.activation_fn = sae.get_activation_fn()
