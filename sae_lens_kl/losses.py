"""Loss terms of the fine-tune, as pure functions. All vocabulary-sized work is float32 and chunked."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sae_lens_kl.splice import VocabProjection

ALPHA_EPS = 1e-8  # paper §3.2: alpha = mse / (kl + 1e-8)


class _ChunkedKL(torch.autograd.Function):
    """mean over tokens of KL(p_clean || p_spliced), summed over the vocabulary.

    Each chunk's logits live only inside the loop: the forward also forms the gradient w.r.t. the
    spliced run output, d KL / d logits = (softmax(spliced) - p_clean) / n (through the softcap and
    unembedding), so nothing vocabulary-sized is saved for backward. Memory is chunk x vocab.
    The unembedding weights are treated as constants (the LM is frozen).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        spliced: torch.Tensor,
        clean: torch.Tensor,
        projection: VocabProjection,
        chunk_tokens: int,
    ) -> torch.Tensor:
        n_tokens = spliced.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad_spliced = torch.empty_like(spliced) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=spliced.device)
        for start in range(0, n_tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            log_p = F.log_softmax(projection.logits(clean[rows]), dim=-1)
            spliced_logits = projection.logits(spliced[rows])
            log_q = F.log_softmax(spliced_logits, dim=-1)
            # One exp per distribution serves both the value and the gradient (F.kl_div would
            # exponentiate log_p again): sum p * (log_p - log_q), and (q - p) / n.
            p = log_p.exp()
            total += torch.sum(p * (log_p - log_q))
            if grad_spliced is not None:
                grad_logits = log_q.exp_().sub_(p).div_(n_tokens)
                grad_spliced[rows] = projection.backward(grad_logits, spliced_logits, spliced.dtype)
        ctx.save_for_backward(grad_spliced)
        return total / n_tokens

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        (grad_spliced,) = ctx.saved_tensors
        return grad_output.to(grad_spliced.dtype) * grad_spliced, None, None, None


def kl_divergence(
    clean: torch.Tensor,
    spliced: torch.Tensor,
    projection: VocabProjection,
    chunk_tokens: int,
) -> torch.Tensor:
    """KL(p_clean || p_spliced) per token, summed over vocab, mean over tokens (float32 scalar).

    `clean` and `spliced` are run outputs [n_tokens, d] (unembedding inputs, or logits when the
    projection is the identity); the gradient flows to `spliced` only.
    """
    if clean.shape != spliced.shape or clean.ndim != 2:
        raise ValueError(f"expected two [n_tokens, d] tensors, got {clean.shape}, {spliced.shape}")
    return _ChunkedKL.apply(spliced, clean.detach(), projection, chunk_tokens)


@torch.no_grad()
def kl_per_token(
    clean: torch.Tensor, other: torch.Tensor, projection: VocabProjection, chunk_tokens: int
) -> torch.Tensor:
    """KL(p_clean || p_other) for every token [n_tokens], float32, no gradient."""
    parts = []
    for start in range(0, clean.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        log_p = F.log_softmax(projection.logits(clean[rows]), dim=-1)
        log_q = F.log_softmax(projection.logits(other[rows]), dim=-1)
        parts.append(F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1))
    return torch.cat(parts)


@torch.no_grad()
def cross_entropy_per_token(
    output: torch.Tensor, targets: torch.Tensor, projection: VocabProjection, chunk_tokens: int
) -> torch.Tensor:
    """Next-token cross-entropy [n_tokens] (float32) of run outputs [n_tokens, d] against targets."""
    parts = []
    for start in range(0, output.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        logits = projection.logits(output[rows])
        parts.append(F.cross_entropy(logits, targets[rows], reduction="none"))
    return torch.cat(parts)


def combine_losses(
    mode: str,
    mse: torch.Tensor,
    kl: torch.Tensor | None,
    aux: torch.Tensor,
    kl_coefficient: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fine-tune objective and the alpha it used (None when no balancing happened).

    kl+mse:        0.5 * (mse + alpha * kl) + aux, alpha = (mse / (kl + 1e-8)).detach()
    kl:            kl + aux
    mse:           mse + aux
    kl+mse-fixed:  mse + kl_coefficient * kl + aux
    `aux` is the architecture's own sparsity/auxiliary loss, kept as SAELens computes it.
    """
    if mode == "mse":
        return mse + aux, None
    assert kl is not None, f"loss mode {mode!r} needs the KL term"
    if mode == "kl":
        return kl + aux, None
    if mode == "kl+mse-fixed":
        return mse + kl_coefficient * kl + aux, None
    alpha = (mse / (kl + ALPHA_EPS)).detach()
    return 0.5 * (mse + alpha * kl) + aux, alpha
