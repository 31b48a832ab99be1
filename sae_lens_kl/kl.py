"""The KL and CE kernels: KL(p_clean || p_spliced) and cross-entropy over the vocabulary, in
float32 (float64 for a float64 model) and in chunks of tokens, so memory does not grow with
batch x seq x vocab; the KL's own backward; the clean distribution's statistics (W_U p, b_U.p,
sum p log p) that let one unembedding product give a spliced run's CE and KL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from sae_lens_kl.vocab import VocabProjection, kl_dtype

CPU_ROW_GROUP_BYTES = 2 << 20
"""Bytes of one [tokens, vocab] tensor the elementwise passes of a KL chunk work on at a time on
CPU (see _row_groups; 4 to 32 GPT-2 rows measured within 5 %)."""


@dataclass(frozen=True)
class CleanStatistics:
    """What KL(p_clean || q) and its gradient need of the clean distribution p, per token, when the
    unembedding is linear (logits = h W_U + b_U, no softcap), float32 (float64 for a float64 model):

        KL(p || q) = sum(p log p) - (W_U p) . h - b_U . p + logsumexp(h W_U + b_U)
        d KL / d h = W_U q - W_U p

    Exact identities, so a step given these needs no clean logits: one unembedding product fewer.
    Computing them costs the clean logits plus one product, so they pay when reused: stored in a
    clean-pass cache, or shared by three or more SAEs in one pass.
    unembed_mean [..., d_model] = W_U p; bias_mean [...] = b_U . p; neg_entropy [...] = sum p log p.
    """

    unembed_mean: torch.Tensor
    bias_mean: torch.Tensor
    neg_entropy: torch.Tensor

    def rows(self, kept_rows: torch.Tensor) -> CleanStatistics:
        """The statistics of [batch, pos] tokens, flattened, at `kept_rows`."""
        return CleanStatistics(
            self.unembed_mean.flatten(0, 1)[kept_rows],
            self.bias_mean.flatten(0, 1)[kept_rows],
            self.neg_entropy.flatten(0, 1)[kept_rows],
        )

    def to(self, device: torch.device | str) -> CleanStatistics:
        return CleanStatistics(*(getattr(self, f.name).to(device) for f in fields(self)))


def _chunks(
    outputs: torch.Tensor, projection: VocabProjection, chunk_tokens: int, count: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, logit buffers [count, rows, vocab]) for each chunk of run outputs [n_tokens, d]. The
    buffers are allocated once and reused for every chunk: on CPU a fresh tensor this size is
    page-faulted in anew each time (docs/performance.md, kernel choices)."""
    n_tokens = outputs.shape[0]
    width = projection.vocab_size(outputs)
    buffers = outputs.new_empty((count, min(chunk_tokens, n_tokens), width), dtype=kl_dtype(outputs.dtype))
    for start in range(0, n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, n_tokens)
        yield slice(start, stop), buffers[:, : stop - start]


@torch.no_grad()
def clean_statistics(clean: torch.Tensor, projection: VocabProjection, chunk_tokens: int) -> CleanStatistics:
    """CleanStatistics of clean run outputs [..., d_model] (unembedding inputs), chunked over tokens."""
    return clean_statistics_and_ce(clean, None, projection, chunk_tokens)[0]


@torch.no_grad()
def clean_statistics_and_ce(
    clean: torch.Tensor, targets: torch.Tensor | None, projection: VocabProjection, chunk_tokens: int
) -> tuple[CleanStatistics, torch.Tensor | None]:
    """CleanStatistics of clean run outputs [..., d_model], and, with `targets` (next-token ids of
    the flattened outputs, any id where there is none), the cross-entropy [n] from the same logits."""
    if not projection.supports_statistics:
        raise ValueError("Clean statistics need a float32/float64 linear unembedding without softcap.")
    assert projection.W_U is not None and projection.b_U is not None
    flat = clean.flatten(0, -2)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    cross_entropy: list[torch.Tensor] = []
    for rows, buffers in _chunks(flat, projection, chunk_tokens, 1):
        logits = projection.logits(flat[rows], out=buffers[0])
        neg_entropy, mass = logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape[0])
        for group in _row_groups(logits):
            log_p = F.log_softmax(logits[group], dim=-1)
            if targets is not None:
                chosen = targets[rows][group, None]
                cross_entropy.append(-log_p.gather(-1, chosen).squeeze(-1))
            p = torch.exp(log_p, out=logits[group])  # p takes the logits' place
            neg_entropy[group] = torch.sum(p * log_p, dim=-1)
            mass[group] = p.sum(-1)
        # In float32 the computed p sums to 1 - delta with delta ~ 1e-5 over a 49k vocabulary, and the
        # KL identity carries that as -delta * logsumexp(q's logits) (~ -2e-4 nats on SmolLM2):
        # describe the renormalised p / mass instead, for which the identity holds.
        parts.append(
            (
                projection.unembed_transposed(logits).div_(mass[:, None]),
                (logits @ projection.b_U).div_(mass),
                neg_entropy.div_(mass).sub_(mass.log()),
            )
        )
    unembed_mean, bias_mean, neg_entropy = (torch.cat(part) for part in zip(*parts, strict=True))
    leading = clean.shape[:-1]
    statistics = CleanStatistics(
        unembed_mean.view(*leading, -1), bias_mean.view(leading), neg_entropy.view(leading)
    )
    return statistics, torch.cat(cross_entropy) if targets is not None else None


@torch.no_grad()
def ce_and_kl_per_token(
    output: torch.Tensor,
    targets: torch.Tensor,
    clean: CleanStatistics,
    projection: VocabProjection,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy against `targets` and KL(p_clean || p_output) [n] (float32) of run outputs
    [n, d_model], from one unembedding product per chunk: the clean side is its CleanStatistics
    (flat, [n]); where there is no next token any target id will do (drop that row)."""
    ce_parts, kl_parts = [], []
    for rows, buffers in _chunks(output, projection, chunk_tokens, 1):
        logits = projection.logits(output[rows], out=buffers[0])
        for group in _row_groups(logits):
            log_normaliser = torch.logsumexp(logits[group], dim=-1)
            chosen = logits[group].gather(-1, targets[rows][group, None]).squeeze(-1)
            ce_parts.append(log_normaliser - chosen)
            outputs = output[rows][group].to(clean.unembed_mean.dtype)
            cross = (clean.unembed_mean[rows][group] * outputs).sum(-1) + clean.bias_mean[rows][group]
            kl_parts.append(clean.neg_entropy[rows][group] - cross + log_normaliser)
    return torch.cat(ce_parts), torch.cat(kl_parts)


class _ChunkedKL(torch.autograd.Function):
    """mean over tokens of KL(p_clean || p_spliced), summed over the vocabulary.

    Each chunk's logits live only inside the loop: the forward also forms the gradient w.r.t. the
    spliced run output, d KL / d logits = (softmax(spliced) - p_clean) / n (through the softcap and
    unembedding), so nothing vocabulary-sized is saved for backward. Memory is chunk x vocab.
    The unembedding weights are treated as constants (the LM is frozen). Given CleanStatistics
    instead of clean outputs, only the spliced logits are formed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        spliced: torch.Tensor,
        clean: torch.Tensor | CleanStatistics,
        projection: VocabProjection,
        chunk_tokens: int,
    ) -> torch.Tensor:
        n_tokens = spliced.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad_spliced = torch.empty_like(spliced) if want_grad else None
        total = torch.zeros((), dtype=kl_dtype(spliced.dtype), device=spliced.device)
        from_statistics = isinstance(clean, CleanStatistics)
        chunk_kl = _chunk_kl_from_statistics if from_statistics else _chunk_kl_from_logits
        # logit buffers: the spliced chunk's (and the clean one's)
        for rows, buffers in _chunks(spliced, projection, chunk_tokens, 1 if from_statistics else 2):
            kl_sum, grad = chunk_kl(spliced, clean, rows, projection, n_tokens, want_grad, buffers)  # type: ignore[arg-type]
            total += kl_sum
            if grad_spliced is not None:
                grad_spliced[rows] = grad
        ctx.save_for_backward(grad_spliced)
        return total / n_tokens

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        (grad_spliced,) = ctx.saved_tensors
        return grad_output.to(grad_spliced.dtype) * grad_spliced, None, None, None


def _row_groups(logits: torch.Tensor) -> list[slice]:
    """Row slices of a chunk's [tokens, vocab] logits for the elementwise passes between the
    unembedding products. On CPU a few tokens at a time (~2 MiB per tensor), so the softmaxes,
    exponentials and products run on rows in cache instead of streaming the whole chunk through
    memory once per pass (with fresh page-faulted allocations; docs/performance.md, kernel
    choices). Elsewhere the whole chunk: a GPU gains nothing from smaller kernels."""
    n_rows = logits.shape[0]
    step = max(1, CPU_ROW_GROUP_BYTES // logits[0].nbytes) if logits.device.type == "cpu" else n_rows
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def _chunk_kl_from_logits(
    spliced: torch.Tensor,
    clean: torch.Tensor,
    rows: slice,
    projection: VocabProjection,
    n_tokens: int,
    want_grad: bool,
    buffers: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum over the chunk's tokens of KL(p || q), and d(mean KL)/d spliced for its rows; the
    logits are written into `buffers` [2, rows, vocab]."""
    clean_logits = projection.logits(clean[rows], out=buffers[0])
    spliced_logits = projection.logits(spliced[rows], out=buffers[1])
    kl_sum = clean_logits.new_zeros(())
    for group in _row_groups(clean_logits):
        log_p = F.log_softmax(clean_logits[group], dim=-1)
        log_q = F.log_softmax(spliced_logits[group], dim=-1)
        # One exp per distribution serves both the value and the gradient (F.kl_div would
        # exponentiate log_p again): sum p * (log_p - log_q), and q - p. The clean logits are not
        # needed again, so p takes their place.
        p = torch.exp(log_p, out=clean_logits[group])
        kl_sum += torch.sum(log_p.sub_(log_q).mul_(p))
        if want_grad:
            grad_logits = projection.softcap_backward_(log_q.exp_().sub_(p), spliced_logits[group])
            spliced_logits[group] = grad_logits
    if not want_grad:
        return kl_sum, None
    # spliced_logits now hold d(sum of KL)/d logits
    return kl_sum, projection.output_gradient(spliced_logits, spliced.dtype).div_(n_tokens)


def _chunk_kl_from_statistics(
    spliced: torch.Tensor,
    clean: CleanStatistics,
    rows: slice,
    projection: VocabProjection,
    n_tokens: int,
    want_grad: bool,
    buffers: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As _chunk_kl_from_logits, from CleanStatistics: only the spliced logits are formed (in
    `buffers` [1, rows, vocab])."""
    assert projection.W_U is not None
    spliced_logits = projection.logits(spliced[rows], out=buffers[0])
    log_normaliser = spliced_logits.new_empty(spliced_logits.shape[0])
    for group in _row_groups(spliced_logits):
        log_normaliser[group] = torch.logsumexp(spliced_logits[group], dim=-1)
        if want_grad:  # q takes the logits' place
            spliced_logits[group].sub_(log_normaliser[group, None]).exp_()
    spliced_rows = spliced[rows].to(clean.unembed_mean.dtype)
    cross = (clean.unembed_mean[rows] * spliced_rows).sum(-1) + clean.bias_mean[rows]
    kl_sum = torch.sum(clean.neg_entropy[rows] - cross + log_normaliser)
    if not want_grad:
        return kl_sum, None
    unembed_q = projection.unembed_transposed(spliced_logits)
    return kl_sum, unembed_q.sub_(clean.unembed_mean[rows]).div_(n_tokens)


def kl_divergence(
    clean: torch.Tensor | CleanStatistics,
    spliced: torch.Tensor,
    projection: VocabProjection,
    chunk_tokens: int,
) -> torch.Tensor:
    """KL(p_clean || p_spliced) per token, summed over vocab, mean over tokens (float32 scalar;
    float64 for a float64 model).

    `clean` and `spliced` are run outputs [n_tokens, d] (unembedding inputs, or logits when the
    projection is the identity), or `clean` is the CleanStatistics of those tokens; the gradient
    flows to `spliced` only.
    """
    if isinstance(clean, CleanStatistics):
        if clean.unembed_mean.shape != spliced.shape or not projection.supports_statistics:
            raise ValueError(f"statistics {clean.unembed_mean.shape} do not fit outputs {spliced.shape}")
        return _ChunkedKL.apply(spliced, clean, projection, chunk_tokens)
    if clean.shape != spliced.shape or clean.ndim != 2:
        raise ValueError(f"expected two [n_tokens, d] tensors, got {clean.shape}, {spliced.shape}")
    return _ChunkedKL.apply(spliced, clean.detach(), projection, chunk_tokens)


@torch.no_grad()
def kl_per_token(
    clean: torch.Tensor, other: torch.Tensor, projection: VocabProjection, chunk_tokens: int
) -> torch.Tensor:
    """KL(p_clean || p_other) for every token [n_tokens], float32, no gradient."""
    parts = []
    for rows, buffers in _chunks(clean, projection, chunk_tokens, 2):
        clean_logits = projection.logits(clean[rows], out=buffers[0])
        other_logits = projection.logits(other[rows], out=buffers[1])
        for group in _row_groups(clean_logits):
            log_p = F.log_softmax(clean_logits[group], dim=-1)
            log_q = F.log_softmax(other_logits[group], dim=-1)
            parts.append(F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1))
    return torch.cat(parts)


@torch.no_grad()
def cross_entropy_per_token(
    output: torch.Tensor, targets: torch.Tensor, projection: VocabProjection, chunk_tokens: int
) -> torch.Tensor:
    """Next-token cross-entropy [n_tokens] (float32) of run outputs [n_tokens, d] against targets."""
    parts = []
    for rows, buffers in _chunks(output, projection, chunk_tokens, 1):
        logits = projection.logits(output[rows], out=buffers[0])
        parts.extend(
            F.cross_entropy(logits[group], targets[rows][group], reduction="none")
            for group in _row_groups(logits)
        )
    return torch.cat(parts)
