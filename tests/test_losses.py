"""The loss terms: chunked KL equals the unchunked reference in value and gradient; alpha."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_lens_kl.config import LOSS_MODES, KLFinetuneConfig
from sae_lens_kl.kl import (
    CPU_ROW_GROUP_BYTES,
    ce_and_kl_per_token,
    clean_statistics,
    clean_statistics_and_ce,
    cross_entropy_per_token,
    kl_divergence,
    kl_per_token,
)
from sae_lens_kl.losses import OBJECTIVES, objective_of, recorded_hooks
from sae_lens_kl.vocab import CPU_VOCAB_BLOCK, VocabProjection, kl_dtype, onednn_linear_available


def projection(softcap: float = 0.0, dtype: torch.dtype = torch.float32, vocab: int = 50) -> VocabProjection:
    generator = torch.Generator().manual_seed(0)
    W_U = torch.randn(16, vocab, generator=generator, dtype=dtype)
    b_U = torch.randn(vocab, generator=generator, dtype=dtype) * 0.1
    return VocabProjection(W_U, b_U, softcap)


def reference_kl(clean: torch.Tensor, spliced: torch.Tensor, proj: VocabProjection) -> torch.Tensor:
    """The reference step's formula: full [n, vocab] log-probs, F.kl_div, autograd."""

    def logits(h: torch.Tensor) -> torch.Tensor:
        z = (h @ proj.W_U + proj.b_U).to(kl_dtype(h.dtype))
        return proj.softcap * torch.tanh(z / proj.softcap) if proj.softcap else z

    log_p = F.log_softmax(logits(clean), -1)
    log_q = F.log_softmax(logits(spliced), -1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_kl_equals_unchunked(softcap: float, chunk: int) -> None:
    proj = projection(softcap)
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(64, 16, generator=generator)
    spliced = (clean + 0.5 * torch.randn(64, 16, generator=generator)).requires_grad_()
    ours = kl_divergence(clean, spliced, proj, chunk)
    (grad_ours,) = torch.autograd.grad(ours * 2.5, spliced)
    spliced_ref = spliced.detach().clone().requires_grad_()
    ref = reference_kl(clean, spliced_ref, proj)
    (grad_ref,) = torch.autograd.grad(ref * 2.5, spliced_ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)
    per_token = kl_per_token(clean, spliced.detach(), proj, chunk)
    torch.testing.assert_close(per_token.mean(), ref.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_kl_from_clean_statistics_equals_the_reference(chunk: int) -> None:
    proj = projection()
    generator = torch.Generator().manual_seed(3)
    clean = torch.randn(2, 32, 16, generator=generator)
    spliced = (clean + 0.5 * torch.randn(2, 32, 16, generator=generator)).flatten(0, 1).requires_grad_()
    statistics = clean_statistics(clean, proj, chunk)
    assert statistics.unembed_mean.shape == (2, 32, 16) and statistics.neg_entropy.shape == (2, 32)
    kept = torch.arange(0, 64, 3)  # a subset of positions, as the trainer's position mask makes
    ours = kl_divergence(statistics.rows(kept), spliced[kept], proj, chunk)
    (grad_ours,) = torch.autograd.grad(ours * 2.5, spliced)
    spliced_ref = spliced.detach().clone().requires_grad_()
    ref = reference_kl(clean.flatten(0, 1)[kept], spliced_ref[kept], proj)
    (grad_ref,) = torch.autograd.grad(ref * 2.5, spliced_ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_kl_over_vocabulary_blocks_and_row_groups_equals_the_reference(softcap: float, chunk: int) -> None:
    """A vocabulary of several CPU product blocks (the last one partial) and chunks of several
    elementwise row groups, compared in float64: only summation order differs (~1e-16 relative
    per operation, over ~10^4 terms)."""
    vocab = 2 * CPU_VOCAB_BLOCK + 101
    proj = projection(softcap, torch.float64, vocab)
    rows_per_group = CPU_ROW_GROUP_BYTES // (vocab * 8)
    n_tokens = 2 * rows_per_group + 3  # with chunk 1000: three row groups, the last one partial
    generator = torch.Generator().manual_seed(4)
    clean = torch.randn(n_tokens, 16, generator=generator, dtype=torch.float64)
    spliced = clean + 0.3 * torch.randn(n_tokens, 16, generator=generator, dtype=torch.float64)
    spliced.requires_grad_()
    ours = kl_divergence(clean, spliced, proj, chunk)
    (grad_ours,) = torch.autograd.grad(ours, spliced)
    spliced_ref = spliced.detach().clone().requires_grad_()
    ref = reference_kl(clean, spliced_ref, proj)
    (grad_ref,) = torch.autograd.grad(ref, spliced_ref)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-10, atol=1e-15)
    per_token = kl_per_token(clean, spliced.detach(), proj, chunk)
    torch.testing.assert_close(per_token.mean(), ref.detach(), rtol=1e-10, atol=0)
    if softcap == 0:
        statistics = clean_statistics(clean, proj, chunk)
        from_statistics = kl_divergence(statistics, spliced, proj, chunk)
        (grad_statistics,) = torch.autograd.grad(from_statistics, spliced)
        torch.testing.assert_close(from_statistics, ref, rtol=1e-10, atol=0)
        torch.testing.assert_close(grad_statistics, grad_ref, rtol=1e-10, atol=1e-15)
    targets = torch.randint(0, vocab, (n_tokens,), generator=generator)
    logits = proj.softcap * torch.tanh((clean @ proj.W_U + proj.b_U) / proj.softcap) if softcap else None
    expected = F.cross_entropy(
        clean @ proj.W_U + proj.b_U if logits is None else logits, targets, reduction="none"
    )
    torch.testing.assert_close(
        cross_entropy_per_token(clean, targets, proj, chunk), expected, rtol=1e-12, atol=0
    )


def test_float32_unembedding_products_are_within_their_rounding_bound() -> None:
    """The float32 CPU products (oneDNN where torch has it, else MKL) against float64: each output
    is a dot product of length n, whose float32 error is at most gamma_n * sum |a_i b_i| plus the
    bias's addition (gamma_n = n u / (1 - n u), u = 2^-24; Higham, Accuracy and Stability, 3.1)."""
    vocab = 2 * CPU_VOCAB_BLOCK + 101
    proj = projection(vocab=vocab)
    assert proj.W_U is not None and proj.b_U is not None
    generator = torch.Generator().manual_seed(5)
    outputs = torch.randn(37, 16, generator=generator)
    by_vocab = torch.randn(37, vocab, generator=generator)
    W, b = proj.W_U.double(), proj.b_U.double()
    u = 2.0**-24

    def gamma(n: int) -> float:
        return n * u / (1 - n * u)

    logits = proj.logits(outputs)
    exact = outputs.double() @ W + b
    bound = gamma(17) * (outputs.double().abs() @ W.abs() + b.abs())
    assert ((logits.double() - exact).abs() <= bound).all()
    back = proj.unembed_transposed(by_vocab)
    exact_back = by_vocab.double() @ W.T
    bound_back = gamma(vocab) * (by_vocab.double().abs() @ W.abs().T)
    assert ((back.double() - exact_back).abs() <= bound_back).all()
    # the oneDNN path is the one measured faster on CPU; where torch has it, it is taken
    assert (proj._vocab_rows is not None) == onednn_linear_available(proj.W_U)


@pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="this torch build has no oneDNN linear; the products take MKL",
)
def test_onednn_products_are_taken_where_torch_has_them() -> None:
    # onednn_linear_available decides by what the build offers; this checks the products then go
    # through oneDNN's op, the path measured ~2x faster than MKL's on CPU (splice.onednn_linear).
    proj = projection(vocab=CPU_VOCAB_BLOCK + 7)
    assert proj.W_U is not None and onednn_linear_available(proj.W_U)
    outputs = torch.randn(9, 16, generator=torch.Generator().manual_seed(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        proj.logits(outputs)
        proj.unembed_transposed(torch.randn(9, proj.W_U.shape[1]))
    counts = {event.key: event.count for event in profile.key_averages()}
    assert counts.get("mkldnn::_linear_pointwise", 0) >= 3  # two vocabulary blocks + the transpose


def test_clean_statistics_refuse_a_softcapped_unembedding() -> None:
    with pytest.raises(ValueError, match="linear unembedding"):
        clean_statistics(torch.randn(4, 16), projection(softcap=3.0), 4)


def test_kl_gradient_passes_gradcheck() -> None:
    proj = projection(2.0, torch.float64)
    generator = torch.Generator().manual_seed(2)
    clean = torch.randn(9, 16, generator=generator, dtype=torch.float64)
    spliced = torch.randn(9, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    # the forward computes in float32 (by design), so compare to finite differences loosely
    assert torch.autograd.gradcheck(
        lambda s: kl_divergence(clean, s, proj, 4).double(),
        (spliced,),
        eps=1e-3,
        atol=1e-3,
        rtol=1e-2,
    )


def test_kl_is_zero_for_identical_runs_and_positive_otherwise() -> None:
    proj = projection()
    h = torch.randn(10, 16)
    assert kl_divergence(h, h.clone(), proj, 3).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(h, h + 1.0, proj, 3).item() > 1e-3


def test_kl_is_float32_for_half_precision_models() -> None:
    proj = projection(dtype=torch.bfloat16)
    h = torch.randn(8, 16, dtype=torch.bfloat16)
    spliced = (h + 0.3).requires_grad_()
    kl = kl_divergence(h, spliced, proj, 3)
    kl.backward()
    assert kl.dtype == torch.float32
    assert spliced.grad is not None and spliced.grad.dtype == torch.bfloat16


def test_cross_entropy_matches_torch() -> None:
    proj = projection()
    h = torch.randn(12, 16)
    targets = torch.randint(0, 50, (12,))
    expected = F.cross_entropy(h @ proj.W_U + proj.b_U, targets, reduction="none")
    torch.testing.assert_close(cross_entropy_per_token(h, targets, proj, 5), expected)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_the_evaluations_one_product_ce_and_kl_equal_the_two_product_ones(chunk: int) -> None:
    # in float64: the identities are exact, so only float64 rounding of terms ~ log(vocab) is left
    proj = projection(dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    clean = torch.randn(40, 16, generator=generator, dtype=torch.float64)
    spliced = clean + 0.5 * torch.randn(40, 16, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 50, (40,), generator=generator)
    statistics, ce_clean = clean_statistics_and_ce(clean, targets, proj, chunk)
    assert ce_clean is not None
    torch.testing.assert_close(
        ce_clean, cross_entropy_per_token(clean, targets, proj, chunk), rtol=0, atol=1e-12
    )
    ce, kl = ce_and_kl_per_token(spliced, targets, statistics, proj, chunk)
    torch.testing.assert_close(ce, cross_entropy_per_token(spliced, targets, proj, chunk), rtol=0, atol=1e-12)
    torch.testing.assert_close(kl, kl_per_token(clean, spliced, proj, chunk), rtol=0, atol=1e-12)
    assert kl.min() > 0


def combine_losses(
    loss: str, mse: torch.Tensor, kl: torch.Tensor | None, aux: torch.Tensor, kl_coefficient: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The objective a `loss=` name stands for, on given MSE and KL values, as the step combines."""
    values = {"mse": mse} if kl is None else {"mse": mse, "kl": kl}
    objective = objective_of(KLFinetuneConfig(tokens=1, loss=loss, kl_coefficient=kl_coefficient))
    return objective.combine(values, aux, mse)


def test_every_loss_name_has_an_objective_and_every_objective_a_name() -> None:
    # the registry's keys are the config's (and so the CLI's) choices
    assert set(OBJECTIVES) == set(LOSS_MODES)
    takers = {name for name, entry in OBJECTIVES.items() if entry.takes_downstream_hooks}
    built = {
        name
        for name in OBJECTIVES
        if recorded_hooks(objective_of(KLFinetuneConfig(tokens=1, loss=name, downstream_hooks=["h"])))
    }
    assert takers == built == {"e2e+ds"}


def test_alpha_makes_the_loss_equal_the_mse() -> None:
    mse = torch.tensor(3.7, requires_grad=True)
    kl = torch.tensor(0.02, requires_grad=True)
    loss, alpha = combine_losses("kl+mse", mse, kl, torch.tensor(0.0), kl_coefficient=1.0)
    assert alpha is not None
    assert loss.item() == pytest.approx(mse.item(), rel=1e-6)
    assert alpha.item() == pytest.approx(3.7 / (0.02 + 1e-8), rel=1e-6)
    loss.backward()
    # alpha is detached: d loss / d kl = 0.5 * alpha, d loss / d mse = 0.5
    assert mse.grad.item() == pytest.approx(0.5)
    assert kl.grad.item() == pytest.approx(0.5 * alpha.item(), rel=1e-6)


def test_loss_modes() -> None:
    mse, kl, aux = torch.tensor(2.0), torch.tensor(0.5), torch.tensor(0.25)
    assert combine_losses("mse", mse, None, aux, 1.0)[0].item() == pytest.approx(2.25)
    # no MSE term: aux, made for the MSE's scale, is put on the KL's (x kl / mse)
    assert combine_losses("kl", mse, kl, aux, 1.0)[0].item() == pytest.approx(0.5 + 0.25 * 0.5 / 2.0)
    assert combine_losses("kl+mse-fixed", mse, kl, aux, 4.0)[0].item() == pytest.approx(4.25)
    assert combine_losses("kl+mse", mse, kl, aux, 1.0)[0].item() == pytest.approx(2.25, rel=1e-6)


def test_an_mse_scale_aux_loss_cannot_swamp_the_kl() -> None:
    # an aux-k loss of an SAE whose MSE is ~1,800 (SmolLM2's residual) beside a KL of 0.2 nats
    mse, kl, aux = torch.tensor(1800.0), torch.tensor(0.2), torch.tensor(60.0)
    for mode in ("kl", "e2e"):
        loss, _ = combine_losses(mode, mse, kl, aux, 1.0)
        assert loss.item() == pytest.approx(0.2 * (1 + 60.0 / 1800.0))  # aux keeps its 1/30 of the fit term
    assert combine_losses("mse", mse, kl, aux, 1.0)[0].item() == pytest.approx(1860.0)  # unchanged
