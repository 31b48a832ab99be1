"""The replacement model of a transcoder set: every transcoder spliced at once, each reading the
activation the replacement model itself brings to its input hook (the earlier transcoders' outputs
included) and replacing its MLP's output. How faithful it is to the model: its next-token CE and
KL(p_clean || p_replacement) per position, and how often its top-1 prediction is the model's —
the numbers circuit-tracer's users judge a set by. Per-sequence sums give paired bootstrap
intervals between two sets evaluated on the same sequences (e.g. before and after a fine-tune)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule, HookPoint

from sae_lens_kl.architectures import to_inference_sae
from sae_lens_kl.config import KL_CHUNK_TOKENS, KLFinetuneConfig
from sae_lens_kl.evaluation import HeldOutEvaluator, special_token_ids
from sae_lens_kl.intervals import LEVEL, N_RESAMPLES, draw_counts
from sae_lens_kl.kl import cross_entropy_per_token, kl_per_token
from sae_lens_kl.parallel import DataParallel
from sae_lens_kl.runs import position_mask
from sae_lens_kl.transcoders import reconstruct
from sae_lens_kl.vocab import VocabProjection

METRICS = ("ce_clean", "ce_replacement", "kl", "top1_agreement")


@dataclass
class ReplacementMetrics:
    """Means over the evaluated positions, and per held-out sequence the sums behind them."""

    ce_clean: float
    ce_replacement: float
    kl: float
    top1_agreement: float
    """Fraction of positions whose most likely next token is the model's."""
    n_tokens: int
    per_sequence: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def ce_gap(self) -> float:
        return self.ce_replacement - self.ce_clean

    def to_dict(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in (*METRICS, "n_tokens")} | {"ce_gap": self.ce_gap}


def check_transcoder_set(transcoders: Sequence[SAE[Any]], model: HookedTransformer) -> None:
    """One clear error, before any work, for a set that is not one replacement model: a member
    without an output hook, two writing one hook, outputs out of layer order, a hook the model
    lacks."""
    outputs = [getattr(t.cfg.metadata, "hook_name_out", None) for t in transcoders]
    if not transcoders or None in outputs:
        raise ValueError(
            "A replacement model needs transcoders (each with metadata.hook_name_out, the hook its "
            "output replaces); pass SAELens transcoders, one per layer."
        )
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"Two transcoders write the same hook ({outputs}); pass one per output hook.")
    missing = [h for t in transcoders for h in (t.cfg.metadata.hook_name, t.cfg.metadata.hook_name_out)]
    missing = [h for h in missing if h not in model.hook_dict]
    if missing:
        raise ValueError(
            f"Hooks {missing} are not in this model; pass the model the transcoders were trained on."
        )
    layers = [int(name.split(".")[1]) if name.startswith("blocks.") else -1 for name in outputs]
    if layers != sorted(layers):
        raise ValueError(f"The transcoders write at layers {layers}, out of order; pass them by layer.")


@contextmanager
def spliced_all(
    model: HookedTransformer, transcoders: Sequence[SAE[Any]], spliced: torch.Tensor
) -> Iterator[None]:
    """Inside the block, the model's forward passes run the replacement model: each transcoder
    reads its input hook in that same pass and its output replaces its output hook's at the
    [batch, pos] positions `spliced` (the others — special tokens, attention sinks — keep what
    flows there, as in training and in the evaluator)."""
    inputs: dict[int, torch.Tensor] = {}

    def read(acts: torch.Tensor, hook: HookPoint, index: int) -> torch.Tensor:  # noqa: ARG001
        inputs[index] = acts
        return acts

    def write(acts: torch.Tensor, hook: HookPoint, index: int) -> torch.Tensor:  # noqa: ARG001
        output, _ = reconstruct(transcoders[index], inputs.pop(index))
        return torch.where(spliced[..., None], output.to(acts.dtype), acts)

    hooks: list[tuple[str, Callable[..., torch.Tensor]]] = []
    for index, transcoder in enumerate(transcoders):
        hooks.append((transcoder.cfg.metadata.hook_name, _bind(read, index)))
        hooks.append((transcoder.cfg.metadata.hook_name_out, _bind(write, index)))
    with model.hooks(fwd_hooks=hooks):
        yield


def _bind(function: Callable[..., torch.Tensor], index: int) -> Callable[..., torch.Tensor]:
    return lambda acts, hook: function(acts, hook, index)


@torch.no_grad()
def replacement_metrics(
    transcoders: Sequence[SAE[Any]],
    model: HookedTransformer,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    exclude_first_positions: int = 0,
    exclude_special_tokens: bool = True,
    chunk_tokens: int = KL_CHUNK_TOKENS,
) -> ReplacementMetrics:
    """The replacement model of `transcoders` on the [n_seq, seq] token sequences `tokens`:
    next-token CE (clean and replacement), KL(p_clean || p_replacement) and top-1 agreement over
    the positions kept: special tokens and the first `exclude_first_positions` of each sequence
    are neither spliced nor scored (as in training), and each sequence's last position, which
    has no next token, is spliced but not scored."""
    check_transcoder_set(transcoders, model)
    projection = VocabProjection.for_run(model, prefix_reuse=True)
    ignored = special_token_ids(model) if exclude_special_tokens else []
    device = next(model.parameters()).device
    sums: dict[str, list[float]] = {name: [] for name in (*METRICS, "n_tokens")}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(device)
        spliced = position_mask(batch, ignored, exclude_first_positions)
        keep = spliced.clone()
        keep[:, -1] = False  # no next token to score
        clean = _final(model, batch)
        with spliced_all(model, transcoders, spliced):
            replaced = _final(model, batch)
        rows = keep.flatten().nonzero().squeeze(1)
        # each kept position's next token (the last position, whose roll wraps around, is not kept)
        targets = torch.roll(batch, -1, dims=1).flatten()[rows]
        clean_rows, replaced_rows = clean.flatten(0, 1)[rows], replaced.flatten(0, 1)[rows]
        values = {
            "ce_clean": cross_entropy_per_token(clean_rows, targets, projection, chunk_tokens),
            "ce_replacement": cross_entropy_per_token(replaced_rows, targets, projection, chunk_tokens),
            "kl": kl_per_token(clean_rows, replaced_rows, projection, chunk_tokens),
            "top1_agreement": _top1(clean_rows, projection, chunk_tokens)
            .eq(_top1(replaced_rows, projection, chunk_tokens))
            .double(),
        }
        sequence = rows // batch.shape[1]
        for name, per_token in values.items():
            per_sequence = torch.zeros(len(batch), dtype=torch.float64, device=per_token.device)
            sums[name].extend(per_sequence.index_add_(0, sequence, per_token.double()).tolist())
        sums["n_tokens"].extend(torch.bincount(sequence, minlength=len(batch)).tolist())
    total = sum(sums["n_tokens"])
    if total == 0:
        raise ValueError("No position is left to evaluate; pass longer sequences or exclude fewer positions.")
    means = {name: sum(sums[name]) / total for name in METRICS}
    return ReplacementMetrics(**means, n_tokens=int(total), per_sequence=sums)


def _final(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The unembedding's input [batch, pos, d] of a forward pass (under any hooks registered):
    the residual after the last block through the final norm and its weights, as
    splice.run_to_output forms it, so that no [batch, pos, vocab] logits are made."""
    residual = model(tokens, stop_at_layer=model.cfg.n_layers)
    return model.ln_final(residual) if model.cfg.normalization_type is not None else residual


def _top1(outputs: torch.Tensor, projection: VocabProjection, chunk_tokens: int) -> torch.Tensor:
    """The most likely next token of each run output [n, d], chunk by chunk."""
    return torch.cat(
        [
            projection.logits(outputs[i : i + chunk_tokens]).argmax(-1)
            for i in range(0, len(outputs), chunk_tokens)
        ]
    )


def paired_differences(
    before: ReplacementMetrics,
    afters: Mapping[str, ReplacementMetrics],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """For each set in `afters` (evaluated on the same sequences as `before`), a 95 % paired
    bootstrap interval over sequences of (after − before) for every metric."""
    counts = torch.tensor(before.per_sequence["n_tokens"], dtype=torch.float64)
    if len(counts) < 2:
        raise ValueError("A bootstrap over held-out sequences needs at least 2 of them; evaluate more.")
    weights = draw_counts(n_resamples, len(counts), torch.Generator().manual_seed(seed))
    n = weights @ counts
    tail = (1 - LEVEL) / 2
    result: dict[str, dict[str, list[float]]] = {}
    for name, after in afters.items():
        if after.per_sequence["n_tokens"] != before.per_sequence["n_tokens"]:
            raise ValueError(
                f"{name} was evaluated on other positions than the set before; use the same tokens."
            )
        result[name] = {}
        for metric in METRICS:
            difference = torch.tensor(after.per_sequence[metric], dtype=torch.float64) - torch.tensor(
                before.per_sequence[metric], dtype=torch.float64
            )
            samples = (weights @ difference) / n
            low, high = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
            result[name][metric] = [low, high]
    return result


@dataclass
class ReplacementSet:
    """A transcoder set's replacement-model metrics on a fine-tune's held-out sequences, before
    (the starting set) and after (the trained one), for the fine-tune's reports."""

    model: HookedTransformer
    tokens: torch.Tensor
    settings: dict[str, Any]
    before: ReplacementMetrics

    @classmethod
    def of(
        cls,
        saes: Sequence[SAE[Any]],
        model: HookedRootModule,
        evaluator: HeldOutEvaluator | None,
        cfg: KLFinetuneConfig,
        parallel: DataParallel,
        plain: bool,
    ) -> ReplacementSet | None:
        """None unless the SAEs are transcoders forming one replacement model (several, one per
        output hook, in layer order) evaluated in one process, each trained as itself (`plain`:
        methods.SAEFinetune, so its inference form is what was trained)."""
        if (
            not plain
            or len(saes) < 2
            or evaluator is None
            or parallel.world_size > 1
            or not isinstance(model, HookedTransformer)
        ):
            return None
        try:
            check_transcoder_set(saes, model)
        except ValueError:
            return None
        tokens = torch.cat(evaluator.batches)
        settings = {
            "batch_size": cfg.eval_batch_size,
            "exclude_first_positions": cfg.exclude_first_positions,
            "exclude_special_tokens": cfg.exclude_special_tokens,
            "chunk_tokens": cfg.kl_chunk_tokens,
        }
        return cls(model, tokens, settings, replacement_metrics(saes, model, tokens, **settings))

    def after(self, trained: Sequence[TrainingSAE[Any]]) -> dict[str, Any]:
        tuned = [to_inference_sae(sae) for sae in trained]
        after = replacement_metrics(tuned, self.model, self.tokens, **self.settings)
        # a bootstrap needs two sequences; one held-out sequence gives the numbers alone
        two = len(self.before.per_sequence["n_tokens"]) >= 2
        return {
            "before": self.before.to_dict(),
            "after": after.to_dict(),
            "after_minus_before_95": paired_differences(self.before, {"after": after})["after"]
            if two
            else None,
        }
