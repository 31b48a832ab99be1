"""Spliced-model evaluation: the numbers an SAE is judged by, computed like `sae_lens.evals`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.util import get_special_token_ids
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.adapters import attached
from sae_lens_kl.architectures import flat_activations, to_inference_sae
from sae_lens_kl.checkpoints import sae_fingerprint
from sae_lens_kl.config import EVAL_TOKENS, FALLBACK_CONTEXT_SIZE, KL_CHUNK_TOKENS
from sae_lens_kl.data import DataError, DataSource, take, token_sequences
from sae_lens_kl.kl import (
    CleanStatistics,
    ce_and_kl_per_token,
    clean_statistics_and_ce,
    cross_entropy_per_token,
    kl_per_token,
)
from sae_lens_kl.parallel import DataParallel
from sae_lens_kl.runs import hooks_on, position_mask, recording
from sae_lens_kl.splice import (
    HookSite,
    Prefix,
    embedded_prefix,
    later_residual_hooks,
    run_prefix,
    run_to_hook,
    run_to_output,
    sae_sites,
    supports_prefix_reuse,
)
from sae_lens_kl.transcoders import reconstruct
from sae_lens_kl.vocab import VocabProjection, kl_dtype


@dataclass
class EvalResult:
    """Metrics over the evaluated positions (special tokens and excluded first positions left out,
    as SAELens's evals leave out special tokens). CE and KL are nats per token."""

    ce_clean: float
    """Cross-entropy of the clean model."""
    ce_spliced: float
    """Cross-entropy with the SAE's reconstruction spliced in."""
    ce_ablated: float
    """Cross-entropy with the replaced hook's activation zeroed (SAELens's zero ablation)."""
    ce_gap: float
    """ce_spliced - ce_clean: what the fine-tune tries to close."""
    ce_score: float
    """(ce_ablated - ce_spliced) / (ce_ablated - ce_clean), SAELens's ce_loss_score."""
    kl: float
    """Mean KL(p_clean || p_spliced)."""
    kl_ablated: float
    """Mean KL(p_clean || p_ablated)."""
    kl_score: float
    """(kl_ablated - kl) / kl_ablated, SAELens's kl_div_score."""
    l0: float
    """Mean active latents per token."""
    mse: float
    """Mean over tokens of the squared reconstruction error summed over dimensions (a transcoder's:
    against the clean activation at its output hook, which its output replaces)."""
    explained_variance: float
    """1 - E||x - x_hat||^2 / Var(x) (SAELens's ExplainedVarianceCalculator)."""
    dead_latents: int
    """Latents that never fired on these tokens."""
    downstream_mse: dict[str, float]
    """At every later hook_resid_post: mean over tokens of the squared difference between the
    spliced and the clean activation, summed over dimensions (Braun et al. 2024, Fig. 2): how far
    the reconstruction's error travels down the network."""
    n_tokens: int
    """Positions evaluated."""
    per_sequence: dict[str, list[float]] = field(default_factory=dict, repr=False)
    """Per held-out sequence, in order: the sums of ce_clean and ce_spliced over its CE positions
    and their count (`n_tokens`): what a paired bootstrap resamples (intervals.py). Not in
    `to_dict`: reports carry the intervals computed from it."""

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        del values["per_sequence"]
        return values

    def copy(self) -> EvalResult:
        return dataclasses.replace(
            self,
            downstream_mse=dict(self.downstream_mse),
            per_sequence={name: list(values) for name, values in self.per_sequence.items()},
        )


def special_token_ids(model: HookedRootModule) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    return [] if tokenizer is None else list(get_special_token_ids(tokenizer))


@torch.no_grad()
def evaluate(
    sae: SAE[Any],
    model: HookedRootModule,
    data: DataSource,
    *,
    n_tokens: int = EVAL_TOKENS,
    batch_size: int = 4,
    context_size: int | None = None,
    prepend_bos: bool | None = None,
    exclude_special_tokens: bool = True,
    exclude_first_positions: int = 0,
    chunk_tokens: int = KL_CHUNK_TOKENS,
    prefix_reuse: bool = True,
) -> EvalResult:
    """Evaluate `sae` spliced into `model` on the first `n_tokens` tokens of `data` (rounded up to
    whole sequences). `data` is any source `kl_finetune` accepts, or a [n_seq, seq] token tensor
    used as it is. Context length and BOS default to the SAE's metadata. To evaluate several SAEs
    on the same tokens, build one `HeldOutEvaluator.for_data(...)` and call it on each: the clean
    pass is then computed once."""
    metadata = sae.cfg.metadata
    evaluator = HeldOutEvaluator.for_data(
        model,
        data,
        n_tokens=n_tokens,
        batch_size=batch_size,
        context_size=context_size or metadata.context_size or FALLBACK_CONTEXT_SIZE,
        prepend_bos=prepend_bos if prepend_bos is not None else metadata.prepend_bos is not False,
        exclude_special_tokens=exclude_special_tokens,
        exclude_first_positions=exclude_first_positions,
        chunk_tokens=chunk_tokens,
        prefix_reuse=prefix_reuse,
        clean_cache_bytes=0,  # one evaluation: nothing to reuse
    )
    return evaluator(sae)


@dataclass
class _CleanPass:
    """One batch's clean pass at one SAE's sites: what every evaluation of an SAE there reuses."""

    prefix: Prefix | None
    output: torch.Tensor
    acts: torch.Tensor
    target: torch.Tensor
    later: dict[str, torch.Tensor]
    statistics: CleanStatistics | None = None
    """The clean distribution at every position (flat), for a linear float32 unembedding: then
    the CE and KL of a spliced pass take one unembedding product (kl.ce_and_kl_per_token)."""
    ce_clean: torch.Tensor | None = None
    """With `statistics`: the clean CE at every position (flat; the last one's is meaningless)."""

    def nbytes(self) -> int:
        tensors = [self.output, self.acts, *self.later.values()]
        tensors += [] if self.target is self.acts else [self.target]
        tensors += [] if self.prefix is None else [self.prefix.residual]
        if self.statistics is not None and self.ce_clean is not None:
            tensors += [*vars(self.statistics).values(), self.ce_clean]
        return sum(t.numel() * t.element_size() for t in tensors)


class HeldOutEvaluator:
    """Evaluates SAEs on fixed token sequences, reusing across calls what does not depend on the
    SAE: the per-token clean and zero-ablation numbers (for every SAE writing at a hook), and,
    while it fits in `clean_cache_bytes`, the clean pass itself (the prefix entering the SAE's
    block, the clean output, the SAE's input and target, the clean activations at later residual
    hooks) for every SAE at the same hooks; a later evaluation then runs only the spliced suffix.
    An SAE already evaluated (same weights, config and hooks) gets its stored result. Reuse is
    exact: the same tensors enter the same computations."""

    def __init__(
        self,
        model: HookedRootModule,
        sequences: torch.Tensor,
        *,
        batch_size: int,
        special_token_ids: list[int],
        exclude_first_positions: int,
        chunk_tokens: int,
        prefix_reuse: bool = True,
        clean_cache_bytes: int = 2**31,
        parallel: DataParallel | None = None,
    ) -> None:
        self.model = model
        self.parallel = parallel or DataParallel()
        # a data-parallel rank evaluates its share of the batches; the results are gathered
        self.batches = self.parallel.parts(list(sequences.split(batch_size)))
        self.n_sequences = len(sequences)
        """Sequences evaluated, over every rank."""
        self.special_token_ids = special_token_ids
        self.exclude_first_positions = exclude_first_positions
        self.chunk_tokens = chunk_tokens
        self.prefix_reuse = prefix_reuse
        self.clean_cache_bytes = clean_cache_bytes
        self._baseline: dict[tuple[str, int | None], list[dict[str, torch.Tensor]]] = {}
        self._clean: dict[tuple[HookSite, HookSite], list[_CleanPass]] = {}
        self._too_big: set[tuple[HookSite, HookSite]] = set()
        self._results: dict[tuple[str, ...], EvalResult] = {}
        self.last: EvalResult | None = None
        """The most recent evaluation's result (per-sequence sums included), for a caller whose
        fine-tune evaluated its result inside `kl_finetune` (paired intervals across runs)."""

    @classmethod
    def for_data(
        cls,
        model: HookedRootModule,
        data: DataSource,
        *,
        n_tokens: int,
        context_size: int,
        prepend_bos: bool = True,
        batch_size: int = 4,
        exclude_special_tokens: bool = True,
        exclude_first_positions: int = 0,
        chunk_tokens: int = KL_CHUNK_TOKENS,
        prefix_reuse: bool = True,
        clean_cache_bytes: int = 2**31,
        parallel: DataParallel | None = None,
    ) -> HeldOutEvaluator:
        """An evaluator on the first `n_tokens` tokens of `data` (whole sequences of
        `context_size`; a [n_seq, seq] token tensor is used as it is). `parallel`: in a
        data-parallel run (`DataParallel.of_run(True)`), each rank evaluates its share."""
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens={n_tokens!r} must be a positive number of tokens to evaluate.")
        if isinstance(data, torch.Tensor) and data.ndim == 2:
            n_seq = -(-n_tokens // data.shape[1])
            if len(data) < n_seq:
                raise DataError(
                    f"The evaluation data holds {len(data)} sequences of {data.shape[1]} tokens, fewer "
                    f"than the {n_seq} that n_tokens={n_tokens} needs; lower n_tokens or pass more data."
                )
            sequences = data[:n_seq].long()
        else:
            n_seq = -(-n_tokens // context_size)
            sequences = take(token_sequences(data, model, context_size, prepend_bos), n_seq)
            if sequences is None:
                raise DataError(
                    f"The evaluation data holds fewer than the {n_seq} sequences of {context_size} tokens "
                    f"that n_tokens={n_tokens} needs; lower n_tokens or pass more data."
                )
        return cls(
            model,
            sequences,
            batch_size=batch_size,
            special_token_ids=special_token_ids(model) if exclude_special_tokens else [],
            exclude_first_positions=exclude_first_positions,
            chunk_tokens=chunk_tokens,
            prefix_reuse=prefix_reuse,
            clean_cache_bytes=clean_cache_bytes,
            parallel=parallel,
        )

    def _ce_and_kl(
        self,
        output: torch.Tensor,
        clean: _CleanPass,
        tokens: torch.Tensor,
        projection: VocabProjection,
        ce_rows: torch.Tensor,
        kept: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A run's next-token CE at the CE positions and KL(p_clean || p_run) at the kept ones, from
        one unembedding product when the clean pass has statistics, else from the clean outputs."""
        if clean.statistics is not None:
            ce, kl = ce_and_kl_per_token(
                output.flatten(0, 1), _next_tokens(tokens), clean.statistics, projection, self.chunk_tokens
            )
            return ce.view(tokens.shape)[:, :-1].flatten()[ce_rows], kl[kept]
        ce = cross_entropy_per_token(
            output[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), projection, self.chunk_tokens
        )
        kl = kl_per_token(clean.output.flatten(0, 1), output.flatten(0, 1), projection, self.chunk_tokens)
        return ce[ce_rows], kl[kept]

    def _ce_clean(
        self, clean: _CleanPass, tokens: torch.Tensor, projection: VocabProjection, ce_rows: torch.Tensor
    ) -> torch.Tensor:
        if clean.ce_clean is not None:
            return clean.ce_clean.view(tokens.shape)[:, :-1].flatten()[ce_rows]
        return cross_entropy_per_token(
            clean.output[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), projection, self.chunk_tokens
        )[ce_rows]

    def _clean_pass(
        self,
        index: int,
        tokens: torch.Tensor,
        site: HookSite,
        write: HookSite,
        reuse: bool,
        projection: VocabProjection,
    ) -> _CleanPass:
        """Batch `index`'s clean pass at these sites: stored, or run (and stored while it fits)."""
        key = (site, write)
        stored = self._clean.get(key, [])
        if index < len(stored):
            return stored[index]
        model = self.model
        later = later_residual_hooks(model, write.hook_name)
        prefix = run_prefix(model, tokens, site) if reuse else None  # type: ignore[arg-type]
        with recording(model, later if write == site else [*later, write.hook_name]) as clean_later:
            output, acts = run_to_output(model, tokens, prefix, site)
        target = acts if write == site else write.read(clean_later[write.hook_name])
        run = _CleanPass(prefix, output, acts, target, {hook: clean_later[hook] for hook in later})
        if projection.supports_statistics:
            run.statistics, run.ce_clean = clean_statistics_and_ce(
                output.flatten(0, 1), _next_tokens(tokens), projection, self.chunk_tokens
            )
        if key not in self._too_big and index == len(stored):
            used = sum(part.nbytes() for parts in self._clean.values() for part in parts)
            if used + run.nbytes() <= self.clean_cache_bytes:
                self._clean.setdefault(key, []).append(run)
            else:  # does not fit: these sites run their clean pass every time
                self._too_big.add(key)
                self._clean.pop(key, None)
        return run

    def _result_key(
        self,
        sae: SAE[Any],
        sites: tuple[HookSite, HookSite],
        spliced_hooks: Sequence[tuple[str, Callable[..., Any]]],
    ) -> tuple[str, ...] | None:
        """What names an evaluation's result: the SAE's weights, config and hook sites (None when
        something else changes the spliced model: an adapter after the SAE, hooks on the LM)."""
        if spliced_hooks or attached(sae) is not None:
            return None
        cfg = {k: v for k, v in sae.cfg.to_dict().items() if k != "metadata"}
        return (sae_fingerprint(sae), json.dumps(cfg, sort_keys=True, default=str), repr(sites))

    @torch.no_grad()
    def __call__(
        self,
        sae: SAE[Any],
        spliced_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
        spliced_from_start: bool = False,
    ) -> EvalResult:
        """`spliced_hooks`: what else the spliced model has (LoRA on the LM); the clean model runs
        without them. `spliced_from_start`: they act before the SAE's block too (LoRA on every
        block), so the SAE encodes the adapted activation and its MSE is against that."""
        if isinstance(sae, TrainingSAE):
            sae = to_inference_sae(sae)
        model = self.model
        # a transcoder reads at `site` and its output replaces the activation at `write`
        site, write = sae_sites(model, sae)
        result_key = self._result_key(sae, (site, write), spliced_hooks)
        if result_key in self._results:
            self.last = self._results[result_key].copy()  # type: ignore[index]
            return self.last.copy()
        reuse = self.prefix_reuse and supports_prefix_reuse(model, site)
        projection = VocabProjection.for_run(model, reuse)
        device = next(model.parameters()).device
        # the baseline (clean, zero-ablated at the written hook) is shared by SAEs writing there
        baseline = self._baseline.get((write.hook_name, write.head_index))
        new_baseline: list[dict[str, torch.Tensor]] = []
        later = later_residual_hooks(model, write.hook_name)
        parts: dict[str, list[torch.Tensor]] = {
            name: []
            for name in ("ce_clean", "ce_ablated", "kl_ablated", "ce_spliced", "kl", "l0", "mse")
            + tuple(f"downstream:{hook}" for hook in later)
        }
        # which sequence each CE position belongs to (within its batch), and each batch's size
        sequence_parts: dict[str, list[torch.Tensor]] = {"ce_sequence": [], "batch_sequences": []}
        variance = ExplainedVarianceCalculator()
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)

        for index, batch in enumerate(
            tqdm(self.batches, desc="Evaluating", leave=False, disable=not self.parallel.is_main)
        ):
            tokens = batch.to(device)
            keep = position_mask(tokens, self.special_token_ids, self.exclude_first_positions)
            kept, ce_rows = keep.flatten(), keep[:, :-1].flatten()
            rows_of = torch.arange(tokens.shape[0], device=device).repeat_interleave(tokens.shape[1] - 1)
            sequence_parts["ce_sequence"].append(rows_of[ce_rows])
            sequence_parts["batch_sequences"].append(torch.tensor([tokens.shape[0]]))
            clean = self._clean_pass(index, tokens, site, write, reuse, projection)
            prefix, acts, target = clean.prefix, clean.acts, clean.target

            if baseline is None:
                ablated_out, _ = run_to_output(model, tokens, prefix, write, torch.zeros_like)
                ce_ablated, kl_ablated = self._ce_and_kl(
                    ablated_out, clean, tokens, projection, ce_rows, kept
                )
                batch_baseline = {
                    "ce_clean": self._ce_clean(clean, tokens, projection, ce_rows),
                    "ce_ablated": ce_ablated,
                    "kl_ablated": kl_ablated,
                }
                new_baseline.append(batch_baseline)
            else:
                batch_baseline = baseline[index]
            for name, values in batch_baseline.items():
                parts[name].append(values)

            spliced_prefix = prefix
            if spliced_from_start:  # LoRA before the SAE: it encodes the adapted activation
                with hooks_on(model, spliced_hooks):
                    spliced_prefix = embedded_prefix(model, tokens, site) if reuse else None  # type: ignore[arg-type]
                    acts = target = run_to_hook(model, tokens, spliced_prefix, site)
            with flat_activations(sae):
                recon, feature_acts = reconstruct(sae, acts.to(sae.device))
                recon = recon.to(target.device, target.dtype)
            spliced_acts = torch.where(keep[..., None], recon, target)
            with recording(model, later) as spliced_later, hooks_on(model, spliced_hooks):
                spliced_out, _ = run_to_output(
                    model, tokens, spliced_prefix, write, lambda _, new=spliced_acts: new
                )
            for hook in later:
                error = (spliced_later[hook] - clean.later[hook])[keep]
                error = error.to(kl_dtype(error.dtype))
                parts[f"downstream:{hook}"].append(error.pow(2).sum(-1))
            ce_spliced, kl_spliced = self._ce_and_kl(spliced_out, clean, tokens, projection, ce_rows, kept)
            parts["ce_spliced"].append(ce_spliced)
            parts["kl"].append(kl_spliced)

            # float32 at least (float64 for a float64 model), as the losses
            x, x_hat = target[keep].to(kl_dtype(target.dtype)), recon[keep].to(kl_dtype(target.dtype))
            active = feature_acts[keep.to(feature_acts.device)] != 0
            parts["l0"].append(active.sum(-1).float())
            parts["mse"].append((x - x_hat).pow(2).sum(-1))
            variance.add_batch(sae_output=x_hat, hidden_acts=x)
            fired |= active.any(0)

        if baseline is None:
            self._baseline[(write.hook_name, write.head_index)] = new_baseline
        if self.parallel.active:  # every rank's per-token values, in batch order, and statistics
            gathered = self.parallel.gather(
                (
                    {name: [v.cpu() for v in values] for name, values in {**parts, **sequence_parts}.items()},
                    vars(variance),
                    fired.cpu(),
                )
            )
            sequence_parts = {
                name: [v for rank_parts, _, _ in gathered for v in rank_parts[name]]
                for name in sequence_parts
            }
            parts = {name: [v for rank_parts, _, _ in gathered for v in rank_parts[name]] for name in parts}
            variance = _merged_variance([state for _, state, _ in gathered])
            fired = torch.stack([rank_fired for _, _, rank_fired in gathered]).any(0)
        # means accumulated in float64: n_tokens terms would lose float32 digits
        means = {name: torch.cat(values).double().mean().item() for name, values in parts.items()}
        ce_clean, ce_spliced, ce_ablated = means["ce_clean"], means["ce_spliced"], means["ce_ablated"]
        result = EvalResult(
            ce_clean=ce_clean,
            ce_spliced=ce_spliced,
            ce_ablated=ce_ablated,
            ce_gap=ce_spliced - ce_clean,
            ce_score=(ce_ablated - ce_spliced) / (ce_ablated - ce_clean),
            kl=means["kl"],
            kl_ablated=means["kl_ablated"],
            kl_score=(means["kl_ablated"] - means["kl"]) / means["kl_ablated"],
            l0=means["l0"],
            mse=means["mse"],
            explained_variance=variance.compute(),
            dead_latents=int((~fired).sum().item()),
            downstream_mse={hook: means[f"downstream:{hook}"] for hook in later},
            n_tokens=sum(part.numel() for part in parts["l0"]),
            per_sequence=_per_sequence_sums(parts, sequence_parts),
        )
        if result_key is not None:
            self._results[result_key] = result.copy()
        self.last = result.copy()
        return result


def _next_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Each position's next token, flat; the last position of a sequence, which has none, gets its
    first token (any id: that row is dropped)."""
    return torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).flatten()


def _per_sequence_sums(
    parts: dict[str, list[torch.Tensor]], sequence_parts: dict[str, list[torch.Tensor]]
) -> dict[str, list[float]]:
    """Sums of the per-position clean and spliced CE over each sequence, in float64, and counts."""
    offsets = torch.cumsum(
        torch.cat([torch.zeros(1, dtype=torch.long), *sequence_parts["batch_sequences"]]), 0
    )
    sequence = torch.cat(
        [
            ids.cpu() + offset
            for ids, offset in zip(sequence_parts["ce_sequence"], offsets[:-1].tolist(), strict=True)
        ]
    )
    n_sequences = int(offsets[-1])
    sums = {}
    for name in ("ce_clean", "ce_spliced"):
        values = torch.cat([part.cpu() for part in parts[name]]).double()
        sums[name] = torch.zeros(n_sequences, dtype=torch.float64).index_add_(0, sequence, values).tolist()
    ones = torch.ones(len(sequence), dtype=torch.float64)
    sums["n_tokens"] = torch.zeros(n_sequences, dtype=torch.float64).index_add_(0, sequence, ones).tolist()
    return sums


def _merged_variance(states: list[dict[str, Any]]) -> ExplainedVarianceCalculator:
    """One ExplainedVarianceCalculator over the batches of several (its sums added: the four
    attributes of sae-lens 6.54's calculator, which has no merge method)."""
    merged = ExplainedVarianceCalculator()
    for state in states:
        if state["sum_x"] is None:
            continue
        merged.sum_x = state["sum_x"] if merged.sum_x is None else merged.sum_x + state["sum_x"]
        merged.sum_squared_norm += state["sum_squared_norm"]
        merged.sum_squared_residual += state["sum_squared_residual"]
        merged.num_samples += state["num_samples"]
    return merged


@torch.no_grad()
def weight_stability(before: SAE[Any], after: SAE[Any]) -> dict[str, dict[str, float]]:
    """How far each latent's weights moved (Karvonen 2025, App. H): the cosine similarity between
    the two SAEs' encoder vectors (W_enc[:, i]) and decoder vectors (W_dec[i]) of every latent,
    as its 25th/50th/75th percentiles. 1.0 means the direction did not move."""
    if (before.cfg.d_in, before.cfg.d_sae) != (after.cfg.d_in, after.cfg.d_sae):
        raise ValueError(
            f"Weight stability compares SAEs of one shape; got d_in x d_sae {before.cfg.d_in} x "
            f"{before.cfg.d_sae} and {after.cfg.d_in} x {after.cfg.d_sae}."
        )
    return {
        "encoder": latent_cosine_percentiles(before.W_enc.T, after.W_enc.T),
        "decoder": latent_cosine_percentiles(before.W_dec, after.W_dec),
    }


@torch.no_grad()
def latent_cosine_percentiles(start: torch.Tensor, end: torch.Tensor) -> dict[str, float]:
    """25th/50th/75th percentiles over latents (rows) of the cosine similarity of `start` and `end`."""
    cosine = torch.nn.functional.cosine_similarity(start.double(), end.to(start.device).double(), dim=-1)
    quantiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    p25, p50, p75 = torch.quantile(cosine.cpu(), quantiles).tolist()
    return {"p25": p25, "p50": p50, "p75": p75}
