"""Attribution with the error node (Marks et al. 2024, sparse feature circuits): how much of a
metric's mechanism each SAE latent carries, and how much stays hidden in what the SAE fails to
reconstruct. A more faithful SAE (after `kl_finetune`) should leave less to the error node.

Every SAE is spliced as x = x_hat(f(x)) + error through a TransformerLens hook, with the error
computed *with* its gradient, so the spliced model equals the clean one in the forward pass and in
the backward pass (upstream gradients are the model's own). SAELens's HookedSAETransformer with
use_error_term=True computes the error under no_grad (sae-lens 6.54), which cuts the gradient of
earlier hooks' nodes through later SAEs; hence this splice, for any SAELens SAE. A transcoder's
latents are computed from its input hook and its output + error replaces its output hook (the
gradient reaches the model's own computation of that output, e.g. the MLP, unchanged).

Scores are gradient x activation (attribution patching): score = dm/da . a summed over every
position of every prompt, the first-order estimate of how much the metric drops when the node is
zero-ablated at all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.transcoder import SkipTranscoder
from transformer_lens import HookedTransformer

from sae_lens_kl.architectures import flat_activations
from sae_lens_kl.config import ATTRIBUTION_METHODS
from sae_lens_kl.splice import HookSite, sae_sites

Metric = Callable[[torch.Tensor], torch.Tensor]
"""Logits [batch, pos, vocab] -> a scalar (e.g. a mean logit difference)."""
ERROR = "error"


@dataclass
class Attribution:
    """Scores of every latent and error node for one metric."""

    metric: float
    """The metric with the SAEs spliced (equal to the clean model's: the error node is kept)."""
    latent_scores: dict[str, torch.Tensor]
    """hook -> [d_sae] score of each latent."""
    error_scores: dict[str, float]
    """hook -> score of the error node."""

    def error_share(self) -> dict[str, float]:
        """hook -> |error score| / (|error score| + sum of |latent scores|): the part of the
        attributed effect the SAE does not explain."""
        shares = {}
        for hook, scores in self.latent_scores.items():
            error = abs(self.error_scores[hook])
            shares[hook] = error / (error + float(scores.abs().sum()))
        return shares

    def error_share_of_all(self) -> float:
        """Over every hook at once (a replacement model's set of SAEs or transcoders): the error
        nodes' summed |score| / (that + every latent's |score|)."""
        errors = sum(abs(score) for score in self.error_scores.values())
        latents = sum(float(scores.abs().sum()) for scores in self.latent_scores.values())
        return errors / (errors + latents)

    def table(self) -> list[dict[str, Any]]:
        """Every node (each latent of each hook, each error node) as a row (hook, node, score),
        largest |score| first: the tidy table, e.g. for `pandas.DataFrame(attribution.table())`."""
        return self.top(sum(len(scores) + 1 for scores in self.latent_scores.values()))

    def top(self, n: int) -> list[dict[str, Any]]:
        """The n nodes (latents and error nodes, all hooks) of largest |score|, as table rows."""
        rows = [
            {"hook": hook, "node": int(index), "score": float(scores[index])}
            for hook, scores in self.latent_scores.items()
            for index in scores.abs().topk(min(n, len(scores))).indices
        ]
        rows += [{"hook": hook, "node": ERROR, "score": score} for hook, score in self.error_scores.items()]
        return sorted(rows, key=lambda row: -abs(row["score"]))[:n]


@dataclass
class _Splice:
    """The splice of one SAE as x_hat(f) + error, and what it kept in the last forward pass.

    The latents f and the error are leaves of the autograd graph (f.grad = J_dec^T g, error.grad
    = g for the gradient g at the hook), and the hook passes g on upstream unchanged, as the clean
    model would (Marks et al.'s feature-circuits passes x.grad = x_recon.grad the same way)."""

    sae: SAE[Any]
    site: HookSite
    """Where the SAE's output replaces the activation (a transcoder's output hook)."""
    transcoder_input: bool = False
    """A transcoder: its input is what `capture` kept at its input hook in this forward pass."""
    keep_latents: torch.Tensor | None = None  # [d_sae] bool: latents left in (others zero-ablated)
    fixed_error: torch.Tensor | None = None  # the clean run's error, when ablating
    scale: float = 1.0  # latents and error scaled by this (integrated gradients' path from 0)
    latents: torch.Tensor | None = None
    error: torch.Tensor | None = None
    captured: torch.Tensor | None = None

    def capture(self, raw: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG002
        """At a transcoder's input hook: keep its input, change nothing."""
        self.captured = raw.detach()
        return raw

    def __call__(self, raw: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG002
        x = self.site.read(raw)
        track = torch.is_grad_enabled()
        with flat_activations(self.sae):
            source = self.captured if self.transcoder_input else x
            assert source is not None
            latents = self.sae.encode(source.to(self.sae.dtype)).detach()
            # a skip transcoder's linear skip term (as SkipTranscoder.forward adds it, sae-lens
            # 6.54): part of the output, no node of its own
            skip: torch.Tensor | float = 0.0
            if isinstance(self.sae, SkipTranscoder):
                skip = (source.to(self.sae.dtype) @ self.sae.W_skip.T).detach().to(x.dtype)
            if self.keep_latents is not None:
                latents = latents * self.keep_latents.to(latents.device, latents.dtype)
            error = (x - self.sae.decode(latents).to(x.dtype) - skip).detach()
            if self.fixed_error is not None:
                error = self.fixed_error
            if self.scale != 1.0:
                latents, error = latents * self.scale, error * self.scale
            latents.requires_grad_(track)
            error.requires_grad_(track)
            reconstruction = self.sae.decode(latents).to(x.dtype) + skip
        self.latents, self.error = latents, error
        # forward: x_hat + (x - x_hat) = x; backward: the gradient reaches x unchanged
        passthrough = x - x.detach() if x.requires_grad else 0
        return self.site.write(raw, reconstruction + error + passthrough)


@contextmanager
def _spliced(
    model: HookedTransformer, saes: Sequence[SAE[Any]], **splice_fields: Any
) -> Iterator[dict[str, _Splice]]:
    """Every SAE spliced into `model`; no gradient reaches the model's or the SAEs' parameters
    (their requires_grad flags are restored afterwards)."""
    splices, hooks = {}, []
    for sae in saes:
        # keyed by the SAE's hook_name (a transcoder's input hook), as SAELens keys them
        read, write = sae_sites(model, sae)
        splice = _Splice(sae, write, read != write, **splice_fields.get(read.hook_name, {}))
        splices[read.hook_name] = splice
        hooks += [(read.hook_name, splice.capture)] if read != write else []
        hooks.append((write.hook_name, splice))
    parameters = [p for module in (model, *saes) for p in module.parameters()]
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        with model.hooks(fwd_hooks=hooks):
            yield splices
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)


def attribute(
    model: HookedTransformer,
    saes: Sequence[SAE[Any]],
    tokens: torch.Tensor,
    metric: Metric,
    *,
    method: str = "atp",
    steps: int = 10,
) -> Attribution:
    """Scores of every latent of `saes` (one per hook, any SAELens SAEs, ours or not) and of each
    error node for `metric` on the prompts `tokens` [batch, pos].

    method="atp": attribution patching, gradient x activation at the clean run (one backward
    pass). method="ig": integrated gradients (Marks et al. 2024's "ig"), per hook: the latents
    and error of that hook scaled together from 0 to their clean values in `steps` midpoint steps
    (the other hooks' nodes at their clean values), activation x mean gradient; the scores of a
    hook then sum to the metric's change when all its nodes go from 0 to clean, up to the
    quadrature's O(1/steps^2) error (one backward pass per hook and step)."""
    _check_hooks(saes)
    if method not in ATTRIBUTION_METHODS or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"method={method!r}, steps={steps!r}: method is 'atp' or 'ig', steps a positive int."
        )
    with _spliced(model, saes) as splices, torch.enable_grad():
        value = metric(model(tokens))
        value.backward()
    clean = {hook: (splice.latents.detach(), splice.error.detach()) for hook, splice in splices.items()}  # type: ignore[union-attr]
    grads = {hook: (_grad(splice.latents), _grad(splice.error)) for hook, splice in splices.items()}
    if method == "ig":
        for hook in splices:
            summed = [torch.zeros_like(clean[hook][0]), torch.zeros_like(clean[hook][1])]
            for step in range(steps):
                with _spliced(model, saes, **{hook: {"scale": (step + 0.5) / steps}}) as scaled:
                    with torch.enable_grad():
                        metric(model(tokens)).backward()
                    summed[0] += _grad(scaled[hook].latents)
                    summed[1] += _grad(scaled[hook].error)
            grads[hook] = (summed[0] / steps, summed[1] / steps)
    latent_scores, error_scores = {}, {}
    for hook, (latents, error) in clean.items():
        latent_grad, error_grad = grads[hook]
        # summed over positions and prompts: the metric's own mean over prompts is in its gradient
        latent_scores[hook] = (latent_grad * latents).sum((0, 1)).float().cpu()
        error_scores[hook] = float((error_grad * error).sum())
    return Attribution(float(value.detach()), latent_scores, error_scores)


def _grad(leaf: torch.Tensor | None) -> torch.Tensor:
    """A leaf's gradient after backward (zeros where the metric did not depend on it)."""
    assert leaf is not None
    return leaf.grad.detach() if leaf.grad is not None else torch.zeros_like(leaf)


@torch.no_grad()
def metric_with_latents(
    model: HookedTransformer,
    saes: Sequence[SAE[Any]],
    tokens: torch.Tensor,
    metric: Metric,
    keep: Mapping[str, torch.Tensor],
) -> float:
    """The metric when, at each hook, only the latents in `keep[hook]` ([d_sae] bool) are left
    in and the others zero-ablated; each error node keeps its clean value."""
    with _spliced(model, saes) as clean:
        model(tokens)
    fields = {hook: {"keep_latents": keep[hook], "fixed_error": s.error} for hook, s in clean.items()}
    with _spliced(model, saes, **fields):
        return float(metric(model(tokens)))


def faithfulness_curve(
    model: HookedTransformer,
    saes: Sequence[SAE[Any]],
    tokens: torch.Tensor,
    metric: Metric,
    attribution: Attribution,
    sizes: Sequence[int],
) -> list[dict[str, float]]:
    """For each N in `sizes`: the metric with only the top-N latents by |score| (over all hooks)
    plus the error nodes kept, and the faithfulness (m(N) - m(none)) / (m(all) - m(none))
    (Marks et al.), where 'none' keeps only the error nodes."""
    scores = torch.cat([attribution.latent_scores[hook] for hook in attribution.latent_scores])
    widths = [len(s) for s in attribution.latent_scores.values()]
    order = scores.abs().argsort(descending=True)

    def keep_top(n: int) -> dict[str, torch.Tensor]:
        chosen = torch.zeros(len(scores), dtype=torch.bool)
        chosen[order[:n]] = True
        return dict(zip(attribution.latent_scores, chosen.split(widths), strict=True))

    none = metric_with_latents(model, saes, tokens, metric, keep_top(0))
    full = attribution.metric
    rows = []
    for n in sizes:
        value = metric_with_latents(model, saes, tokens, metric, keep_top(n))
        rows.append({"n_latents": n, "metric": value, "faithfulness": (value - none) / (full - none)})
    return rows


def compare_circuits(
    saes: Mapping[str, SAE[Any] | Sequence[SAE[Any]]],
    model: HookedTransformer,
    tokens: torch.Tensor,
    metric: Metric,
    sizes: Sequence[int] = (1, 2, 5, 10, 20, 50, 100),
    top: int = 10,
    method: str = "atp",
    steps: int = 10,
) -> dict[str, Any]:
    """The same analysis for each SAE, or each group of SAEs at several hooks (e.g.
    {"before": sae, "after": kl_finetune(sae, ...)}): the error nodes' shares, the top nodes and
    the faithfulness curve. `method` and `steps` as in `attribute`."""
    result: dict[str, Any] = {}
    for name, group in saes.items():
        group = [group] if isinstance(group, SAE) else list(group)
        attribution = attribute(model, group, tokens, metric, method=method, steps=steps)
        result[name] = {
            "metric": attribution.metric,
            "error_share": attribution.error_share(),
            "error_share_of_all": attribution.error_share_of_all(),
            "top_nodes": attribution.top(top),
            "faithfulness": faithfulness_curve(model, group, tokens, metric, attribution, sizes),
        }
    return result


def _check_hooks(saes: Sequence[SAE[Any]]) -> None:
    hooks = [sae.cfg.metadata.hook_name for sae in saes]
    written = [sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name for sae in saes]
    if not saes or len(set(hooks)) != len(hooks) or len(set(written)) != len(written):
        raise ValueError(f"Pass one SAE per hook point (got hooks {hooks}, whose outputs replace {written}).")


@dataclass(frozen=True)
class PromptTask:
    """Prompts and a metric on their logits."""

    name: str
    tokens: torch.Tensor
    metric: Metric
    accuracy: float
    """The clean model's top-1 accuracy on what the metric scores (check it solves the task)."""


@torch.no_grad()
def induction_task(
    model: HookedTransformer, text_tokens: torch.Tensor, n_prompts: int, length: int
) -> PromptTask:
    """Induction from real text: each prompt is BOS + a span of `length` tokens of the text + the
    same span again; the metric is the mean log-probability of the correct next token over the
    repeated span (after its first token), which a model predicts by copying."""
    spans = text_tokens.flatten()
    if len(spans) < n_prompts * length:
        raise ValueError(
            f"The text has {len(spans)} tokens, fewer than n_prompts x length = {n_prompts * length}."
        )
    spans = spans[: n_prompts * length].view(n_prompts, length).to(next(model.parameters()).device)
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    first = torch.full((n_prompts, 1), bos if bos is not None else int(spans[0, 0]), device=spans.device)
    tokens = torch.cat([first, spans, spans], dim=1)
    scored = slice(length + 1, 2 * length)  # positions predicting the 2nd..last token of the repeat
    targets = tokens[:, length + 2 :]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        log_probs = logits[:, scored].log_softmax(-1)
        return log_probs.gather(-1, targets[..., None]).mean()

    accuracy = float((model(tokens)[:, scored].argmax(-1) == targets).float().mean())
    return PromptTask(f"induction ({n_prompts} prompts, spans of {length} tokens)", tokens, metric, accuracy)


def circuits_markdown(
    task: PromptTask, result: Mapping[str, Any], scores: str = "attribution patching"
) -> str:
    names = list(result)
    lines = [
        f"# Circuit analysis: {task.name}",
        "",
        f"Clean model's top-1 accuracy: {task.accuracy:.1%}. Scores: {scores}.",
        "",
    ]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append(
        "| metric (spliced with error) | " + " | ".join(f"{result[n]['metric']:.4f}" for n in names) + " |"
    )
    for hook in result[names[0]]["error_share"]:
        cells = " | ".join(f"{result[n]['error_share'][hook]:.1%}" for n in names)
        lines.append(f"| error node's share of the absolute attribution at {hook} | {cells} |")
    if len(result[names[0]]["error_share"]) > 1:
        cells = " | ".join(f"{result[n]['error_share_of_all']:.1%}" for n in names)
        lines.append(f"| error nodes' share of the absolute attribution, all hooks | {cells} |")
    for index, row in enumerate(result[names[0]]["faithfulness"]):
        cells = " | ".join(f"{result[n]['faithfulness'][index]['faithfulness']:.3f}" for n in names)
        lines.append(f"| faithfulness, top {row['n_latents']} latents + error | {cells} |")
    for name in names:
        top = ", ".join(f"{row['node']} ({row['score']:+.3g})" for row in result[name]["top_nodes"])
        lines += ["", f"Top nodes, {name}: {top}"]
    return "\n".join(lines) + "\n"
