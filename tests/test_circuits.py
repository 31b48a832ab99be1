"""Attribution with the error node: the splice leaves the model's forward and backward passes as
they are, scores agree with real ablations, several SAEs compose, faithfulness is anchored."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_sae, random_tokens, tiny_model

from sae_lens_kl.circuits import ERROR, attribute, compare_circuits, faithfulness_curve, metric_with_latents

TOKENS = random_tokens(6, seq=12, seed=5)
TARGETS = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(6))


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of fixed next tokens at the last position."""
    log_probs = logits[:, -1].log_softmax(-1)
    return log_probs[torch.arange(len(TARGETS)), TARGETS].mean()


def float64_setup(*hooks: str) -> tuple[torch.nn.Module, list]:
    # float64 throughout: the splice x_hat + (x - x_hat) then equals x to ~1e-16 relative.
    model = tiny_model(dtype=torch.float64)
    saes = [make_sae("topk", hook_name=hook, seed=index + 1).double() for index, hook in enumerate(hooks)]
    return model, saes


def test_the_splice_keeps_the_models_metric() -> None:
    model, saes = float64_setup("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    attribution = attribute(model, saes, TOKENS, metric)
    with torch.no_grad():
        clean = float(metric(model(TOKENS)))
    assert attribution.metric == pytest.approx(clean, abs=1e-12)
    assert all(0 <= share <= 1 for share in attribution.error_share().values())
    table = attribution.table()  # every latent of both SAEs and both error nodes, largest first
    assert len(table) == 2 * (96 + 1) and sum(row["node"] == ERROR for row in table) == 2
    assert [abs(row["score"]) for row in table] == sorted((abs(row["score"]) for row in table), reverse=True)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated in the user's model


def test_an_earlier_hooks_scores_do_not_depend_on_later_saes() -> None:
    # The later splice passes the gradient through unchanged, as the clean model would.
    model, (early, late) = float64_setup("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    alone = attribute(model, [early], TOKENS, metric)
    both = attribute(model, [early, late], TOKENS, metric)
    hook = "blocks.0.hook_resid_post"
    torch.testing.assert_close(both.latent_scores[hook], alone.latent_scores[hook], rtol=1e-9, atol=1e-12)
    assert both.error_scores[hook] == pytest.approx(alone.error_scores[hook], rel=1e-9)


def test_scores_predict_real_ablations() -> None:
    model, (sae,) = float64_setup("blocks.1.hook_resid_pre")
    attribution = attribute(model, [sae], TOKENS, metric)
    scores = attribution.latent_scores["blocks.1.hook_resid_pre"]
    top = scores.abs().argsort(descending=True)[:8]
    predicted, actual = [], []
    for latent in top:
        keep = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
        keep[latent] = False
        ablated = metric_with_latents(model, [sae], TOKENS, metric, {"blocks.1.hook_resid_pre": keep})
        predicted.append(float(scores[latent]))  # first-order estimate of metric - ablated metric
        actual.append(attribution.metric - ablated)
    # A first-order estimate, not an exact one: the signs agree, the sizes agree within a factor
    # of 2 (a wrong normalisation over prompts or positions is off by their number, 6 or 12), and
    # the ranks correlate.
    assert sum((p > 0) == (a > 0) for p, a in zip(predicted, actual, strict=True)) >= 7
    assert all(0.5 < p / a < 2 for p, a in zip(predicted, actual, strict=True))
    ranks = [torch.tensor(values).abs().argsort().argsort().double() for values in (predicted, actual)]
    assert torch.corrcoef(torch.stack(ranks))[0, 1] > 0.6


def test_an_sae_that_reconstructs_nothing_leaves_everything_to_the_error_node() -> None:
    model, (sae,) = float64_setup("blocks.1.hook_resid_pre")
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    attribution = attribute(model, [sae], TOKENS, metric)
    assert attribution.error_share()["blocks.1.hook_resid_pre"] == 1.0
    assert attribution.top(1)[0]["node"] == ERROR


def test_compare_circuits_and_faithfulness_are_anchored() -> None:
    model, (before, after) = float64_setup("blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre")
    result = compare_circuits({"before": before, "after": after}, model, TOKENS, metric, sizes=(1, 8, 96))
    assert set(result) == {"before", "after"} and len(result["before"]["top_nodes"]) == 10
    for run in result.values():
        curve = run["faithfulness"]
        assert [row["n_latents"] for row in curve] == [1, 8, 96]
        assert curve[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-9)  # every latent kept
    attribution = attribute(model, [before], TOKENS, metric)
    none = faithfulness_curve(model, [before], TOKENS, metric, attribution, sizes=(0,))
    assert none[0]["faithfulness"] == pytest.approx(0.0, abs=1e-12)


def test_one_sae_per_hook() -> None:
    model, saes = float64_setup("blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match="one SAE per hook point"):
        attribute(model, saes, TOKENS, metric)


def test_compare_circuits_through_saes_at_several_hooks() -> None:
    model, saes = float64_setup("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    result = compare_circuits({"pair": saes}, model, TOKENS, metric, sizes=(2 * 96,))
    assert set(result["pair"]["error_share"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    # the share over both hooks lies between the two hooks' own shares (a mediant of them)
    shares = result["pair"]["error_share"].values()
    assert min(shares) <= result["pair"]["error_share_of_all"] <= max(shares)
    # every latent of both SAEs kept (+ errors): the clean metric, faithfulness 1
    assert result["pair"]["faithfulness"][0]["faithfulness"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder"])
def test_transcoders_splice_with_their_error_node(architecture: str) -> None:
    # a transcoder (block 1's MLP input -> output) beside an SAE at an earlier hook, float64
    model = tiny_model(dtype=torch.float64)
    transcoder = make_sae(architecture, dtype="float64")
    if architecture == "skip_transcoder":
        with torch.no_grad():
            transcoder.W_skip.normal_(0, 0.1)
    sae = make_sae("topk", hook_name="blocks.0.hook_resid_post", dtype="float64")
    attribution = attribute(model, [sae, transcoder], TOKENS, metric)
    with torch.no_grad():
        clean = float(metric(model(TOKENS)))
    assert attribution.metric == pytest.approx(clean, abs=1e-12)
    hook = "blocks.1.ln2.hook_normalized"  # keyed by the transcoder's hook_name, as SAELens keys it
    assert 0 < attribution.error_share()[hook] < 1 and attribution.latent_scores[hook].abs().sum() > 0
    # every latent kept (+ errors): the clean metric; no latent: only the errors (and skip) left
    curve = faithfulness_curve(model, [sae, transcoder], TOKENS, metric, attribution, sizes=(2 * 96,))
    assert curve[0]["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    with torch.no_grad():
        transcoder.W_dec.zero_()
        transcoder.b_dec.zero_()
        if architecture == "skip_transcoder":
            transcoder.W_skip.zero_()
    assert attribute(model, [transcoder], TOKENS, metric).error_share()[hook] == 1.0


def test_transcoder_scores_predict_real_ablations() -> None:
    model, transcoder = tiny_model(dtype=torch.float64), make_sae("transcoder", dtype="float64")
    hook = "blocks.1.ln2.hook_normalized"
    attribution = attribute(model, [transcoder], TOKENS, metric)
    scores = attribution.latent_scores[hook]
    predicted, actual = [], []
    for latent in scores.abs().argsort(descending=True)[:8]:
        keep = torch.ones(transcoder.cfg.d_sae, dtype=torch.bool)
        keep[latent] = False
        ablated = metric_with_latents(model, [transcoder], TOKENS, metric, {hook: keep})
        predicted.append(float(scores[latent]))
        actual.append(attribution.metric - ablated)
    # The signs agree and the largest estimate is the largest real effect. (The sizes are cruder
    # than for the SAE in test_scores_predict_real_ablations, up to ~2.2x here: a random ReLU
    # transcoder replacing the MLP's output moves the metric far from linearly.)
    assert sum((p > 0) == (a > 0) for p, a in zip(predicted, actual, strict=True)) >= 7
    assert max(range(8), key=lambda i: abs(actual[i])) == 0


def test_an_sae_and_a_transcoder_replacing_one_hook_are_refused() -> None:
    model = tiny_model()
    at_mlp_out = make_sae("topk", hook_name="blocks.1.hook_mlp_out")
    with pytest.raises(ValueError, match="one SAE per hook point"):
        attribute(model, [at_mlp_out, make_sae("transcoder")], TOKENS, metric)


def test_integrated_gradients_are_complete_up_to_the_quadrature_error() -> None:
    """IG's scores at a hook sum to m(clean) - m(that hook's latents and error all zero, i.e. the
    SAE's output b_dec there), up to the midpoint rule's O(1/steps^2) error; attribution
    patching's first-order estimate has no such guarantee."""
    hook = "blocks.1.hook_resid_pre"
    model, (sae,) = float64_setup(hook)
    _, cache = model.run_with_cache(TOKENS, names_filter=[hook])
    with torch.no_grad():
        # a trained SAE's b_dec sits near the mean activation; at b_dec = 0 the path would pass
        # through LayerNorm's scale-invariant singularity at 0
        sae.b_dec.copy_(cache[hook][:, 1:].mean((0, 1)))
        clean = float(metric(model(TOKENS)))
        to_b_dec = model.run_with_hooks(
            TOKENS,
            fwd_hooks=[(hook, lambda raw, hook: sae.b_dec.expand_as(raw))],  # noqa: ARG005
        )
    change = clean - float(metric(to_b_dec))

    def gap(attribution) -> float:
        total = float(attribution.latent_scores[hook].sum()) + attribution.error_scores[hook]
        return abs(total - change)

    coarse = gap(attribute(model, [sae], TOKENS, metric, method="ig", steps=8))
    fine = gap(attribute(model, [sae], TOKENS, metric, method="ig", steps=32))
    # (32/8)^2 = 16 for a smooth path; 8 leaves room for the higher-order terms
    assert fine <= coarse / 8
    assert fine <= 1e-3 * abs(change)
    assert gap(attribute(model, [sae], TOKENS, metric)) > 10 * fine  # attribution patching
    with pytest.raises(ValueError, match="method"):
        attribute(model, [sae], TOKENS, metric, method="gradients")
