"""The vocabulary projection: logits from the unembedding in column blocks (through oneDNN's
linear where torch has it, measured ~2x MKL's on CPU), and the float dtype the losses use."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule


def kl_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of every vocabulary-sized computation: float32, or float64 for a float64 model
    (used to compare two computations of the same quantity at float64 rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


CPU_VOCAB_BLOCK = 2048
"""Vocabulary columns per unembedding product on CPU. Each [tokens, block] piece of the logits is
written while it is in cache; one product over the whole vocabulary writes [tokens, vocab] through
memory and is slower (docs/performance.md, kernel choices)."""


def onednn_linear_available(weight: torch.Tensor) -> bool:
    """Whether float32 CPU products with `weight` go through oneDNN (`onednn_linear`).

    torch 2.13's CPU build runs float32 matmuls through MKL, slower on this project's AMD EPYC
    machines than oneDNN, which dispatches on the CPU's instruction set (docs/performance.md, kernel choices).
    `torch.backends.mkldnn.enabled = False` switches it off."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """inputs @ weight.T + bias, as F.linear, through oneDNN's linear: torch's own op for inductor's
    CPU linears (`mkldnn::_linear_pointwise`, used as of torch 2.13; a build without it takes MKL,
    see onednn_linear_available), with no fused activation. `weight` [out, in] must be contiguous:
    a strided one falls to a much slower kernel (torch 2.13; docs/performance.md, kernel
    choices). The op has no autograd kernel (its backward would silently give no gradient), so
    under autograd this is F.linear."""
    tensors = (inputs, weight) if bias is None else (inputs, weight, bias)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return F.linear(inputs, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), weight, bias, "none", [], "")


@dataclass(frozen=True)
class VocabProjection:
    """Maps a run's output to logits: the model's unembedding (+ softcap), or nothing for logits."""

    W_U: torch.Tensor | None
    b_U: torch.Tensor | None
    softcap: float

    @classmethod
    def for_run(cls, model: HookedRootModule, prefix_reuse: bool) -> VocabProjection:
        if not prefix_reuse:
            return cls(None, None, 0.0)
        assert isinstance(model, HookedTransformer)
        # Use the parameters directly: TransformerLens's Unembed makes a contiguous copy of W_U on
        # every call (transformer-lens 3.9), which the chunked projection would repeat per chunk.
        return cls(
            model.unembed.W_U.detach(),
            model.unembed.b_U.detach(),
            # TransformerLens marks "no softcap" as -1.0 (or None)
            max(float(model.cfg.output_logits_soft_cap or 0.0), 0.0),
        )

    @property
    def supports_statistics(self) -> bool:
        """Whether CleanStatistics describe the clean distribution exactly: a float32 (or float64)
        linear unembedding (in lower precision W_U q - W_U p would cancel away the signal)."""
        return self.W_U is not None and self.softcap == 0 and self.W_U.dtype in (torch.float32, torch.float64)

    def vocab_size(self, output: torch.Tensor) -> int:
        """Width of the logits of run outputs like `output` [..., d]."""
        return output.shape[-1] if self.W_U is None else self.W_U.shape[1]

    def logits(self, output: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a chunk of run outputs [n, d], in float32 (float64 for a float64 model),
        written into `out` [n, vocab] (a new tensor if None; reuse one for every chunk: on CPU a
        fresh tensor this size is page-faulted in again each time)."""
        dtype = kl_dtype(output.dtype)
        if out is None:
            out = output.new_empty((output.shape[0], self.vocab_size(output)), dtype=dtype)
        if self.W_U is None:
            out.copy_(output)
        elif output.dtype == self.W_U.dtype == dtype:
            assert self.b_U is not None
            vocab = self.W_U.shape[1]
            block = CPU_VOCAB_BLOCK if output.device.type == "cpu" else vocab
            for start in range(0, vocab, block):
                columns = slice(start, start + block)
                if self._vocab_rows is not None:
                    out[:, columns] = onednn_linear(output, self._vocab_rows[columns], self.b_U[columns])
                else:
                    torch.addmm(self.b_U[columns], output, self.W_U[:, columns], out=out[:, columns])
        else:
            out.copy_(torch.addmm(self.b_U, output, self.W_U))
        if self.softcap > 0:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def softcap_backward_(self, grad_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. the logits before the softcap, in place of `grad_logits` (the
        gradient w.r.t. `logits`, the capped logits)."""
        if self.softcap > 0:
            grad_logits.mul_(1 - (logits / self.softcap) ** 2)
        return grad_logits

    def output_gradient(self, grad_logits: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Gradient w.r.t. the run outputs [n, d] given the gradient w.r.t. their logits before the
        softcap [n, vocab]."""
        if self.W_U is None:
            return grad_logits.to(out_dtype)
        return self.unembed_transposed(grad_logits.to(self.W_U.dtype))

    def unembed_transposed(self, by_vocab: torch.Tensor) -> torch.Tensor:
        """by_vocab [n, vocab] @ W_U^T: [n, d_model] (gradients, and W_U p of a distribution p)."""
        assert self.W_U is not None
        if self._vocab_rows is not None:  # W_U is [d_model, vocab]: F.linear's [out, in]
            return onednn_linear(by_vocab, self._unembed_contiguous, None)
        return by_vocab @ self.W_U.T

    @functools.cached_property
    def _vocab_rows(self) -> torch.Tensor | None:
        """W_U^T [vocab, d_model], contiguous, when the products go through oneDNN (made once per
        projection: the size of W_U)."""
        if self.W_U is None or not onednn_linear_available(self.W_U):
            return None
        return self.W_U.T.contiguous()

    @functools.cached_property
    def _unembed_contiguous(self) -> torch.Tensor:
        assert self.W_U is not None
        return self.W_U.contiguous()
