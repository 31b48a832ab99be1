"""Spliced-model evaluation: the numbers an SAE is judged by, computed like `sae_lens.evals`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
from sae_lens_kl.data import DataSource, held_out_sequences
from sae_lens_kl.eval_result import EvalResult, merged_variance, result_of
from sae_lens_kl.kl import ce_and_kl_per_token, clean_statistics_and_ce, cross_entropy_per_token, kl_per_token
from sae_lens_kl.parallel import DataParallel
from sae_lens_kl.runs import CleanRun, SpliceRunner, position_mask
from sae_lens_kl.splice import HookSite, later_residual_hooks, linear_layout, sae_sites
from sae_lens_kl.transcoders import reconstruct
from sae_lens_kl.vocab import VocabProjection, kl_dtype


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
    """One batch's clean run at one SAE's sites (the later residual hooks recorded): what every
    evaluation of an SAE there reuses. With a linear float32 unembedding the clean distribution is
    kept as `run.statistics` (a spliced pass's CE and KL then take one unembedding product,
    kl.ce_and_kl_per_token) and the clean CE beside it."""

    run: CleanRun
    ce_clean: torch.Tensor | None = None
    """With statistics: the clean CE at every position (flat; the last one's is meaningless)."""

    def nbytes(self) -> int:
        run = self.run
        tensors = [run.acts, *run.recorded.values()]
        tensors += [t for t in (run.target, run.final, self.ce_clean) if t is not None]
        tensors += [] if run.prefix is None else [run.prefix.residual]
        tensors += [] if run.statistics is None else list(vars(run.statistics).values())
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
        sequences = held_out_sequences(
            data, model, n_tokens=n_tokens, context_size=context_size, prepend_bos=prepend_bos
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
        projection: VocabProjection,
        ce_rows: torch.Tensor,
        kept: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A run's next-token CE at the CE positions and KL(p_clean || p_run) at the kept ones, from
        one unembedding product when the clean pass has statistics, else from the clean outputs."""
        run = clean.run
        tokens = run.tokens
        if run.statistics is not None:
            ce, kl = ce_and_kl_per_token(
                output.flatten(0, 1), _next_tokens(tokens), run.statistics, projection, self.chunk_tokens
            )
            return ce.view(tokens.shape)[:, :-1].flatten()[ce_rows], kl[kept]
        assert run.final is not None
        ce = cross_entropy_per_token(
            output[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), projection, self.chunk_tokens
        )
        kl = kl_per_token(run.final.flatten(0, 1), output.flatten(0, 1), projection, self.chunk_tokens)
        return ce[ce_rows], kl[kept]

    def _ce_clean(
        self, clean: _CleanPass, projection: VocabProjection, ce_rows: torch.Tensor
    ) -> torch.Tensor:
        tokens = clean.run.tokens
        if clean.ce_clean is not None:
            return clean.ce_clean.view(tokens.shape)[:, :-1].flatten()[ce_rows]
        assert clean.run.final is not None
        return cross_entropy_per_token(
            clean.run.final[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), projection, self.chunk_tokens
        )[ce_rows]

    def _clean_pass(self, index: int, tokens: torch.Tensor, runner: SpliceRunner) -> _CleanPass:
        """Batch `index`'s clean pass at the runner's sites: stored, or run (and stored while it
        fits)."""
        key = (runner.site, runner.write_site)
        stored = self._clean.get(key, [])
        if index < len(stored):
            return stored[index]
        run = runner.clean_run(tokens, record=later_residual_hooks(self.model, runner.write_site.hook_name))
        clean = _CleanPass(run)
        if runner.projection.supports_statistics:
            assert run.final is not None
            statistics, clean.ce_clean = clean_statistics_and_ce(
                run.final.flatten(0, 1), _next_tokens(run.tokens), runner.projection, self.chunk_tokens
            )
            clean.run = replace(run, final=None, statistics=statistics)
        if key not in self._too_big and index == len(stored):
            used = sum(part.nbytes() for parts in self._clean.values() for part in parts)
            if used + clean.nbytes() <= self.clean_cache_bytes:
                self._clean.setdefault(key, []).append(clean)
            else:  # does not fit: these sites run their clean pass every time
                self._too_big.add(key)
                self._clean.pop(key, None)
        return clean

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
        """The evaluation of `sae`. `spliced_hooks`: what else the spliced model has (LoRA on the
        LM); the clean model runs without them. `spliced_from_start`: they act before the SAE's
        block too (LoRA on every block), so the SAE encodes the adapted activation and its MSE is
        against that."""
        with linear_layout(self.model):
            return self._evaluate(sae, spliced_hooks, spliced_from_start)

    def _evaluate(
        self,
        sae: SAE[Any],
        spliced_hooks: Sequence[tuple[str, Callable[..., Any]]],
        spliced_from_start: bool,
    ) -> EvalResult:
        if isinstance(sae, TrainingSAE):
            sae = to_inference_sae(sae)
        model = self.model
        # a transcoder reads at `site` and its output replaces the activation at `write`
        site, write = sae_sites(model, sae)
        result_key = self._result_key(sae, (site, write), spliced_hooks)
        if result_key in self._results:
            self.last = self._results[result_key].copy()  # type: ignore[index]
            return self.last.copy()
        clean_runner = SpliceRunner(model, site, write_site=write, prefix_reuse=self.prefix_reuse)
        spliced_runner = SpliceRunner(
            model,
            site,
            write_site=write,
            prefix_reuse=self.prefix_reuse,
            spliced_hooks=spliced_hooks,
            spliced_from_start=spliced_from_start,
        )
        projection = clean_runner.projection
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
            clean = self._clean_pass(index, tokens, clean_runner)

            if baseline is None:
                ablated_out, _ = clean_runner.spliced_output(clean.run, torch.zeros_like)
                ce_ablated, kl_ablated = self._ce_and_kl(ablated_out, clean, projection, ce_rows, kept)
                batch_baseline = {
                    "ce_clean": self._ce_clean(clean, projection, ce_rows),
                    "ce_ablated": ce_ablated,
                    "kl_ablated": kl_ablated,
                }
                new_baseline.append(batch_baseline)
            else:
                batch_baseline = baseline[index]
            for name, values in batch_baseline.items():
                parts[name].append(values)

            spliced = _Splice(sae, keep, clean.run, from_start=spliced_from_start)
            spliced_out, spliced_later = spliced_runner.spliced_output(clean.run, spliced, later)
            for hook in later:
                error = (spliced_later[hook] - clean.run.recorded[hook])[keep]
                error = error.to(kl_dtype(error.dtype))
                parts[f"downstream:{hook}"].append(error.pow(2).sum(-1))
            ce_spliced, kl_spliced = self._ce_and_kl(spliced_out, clean, projection, ce_rows, kept)
            parts["ce_spliced"].append(ce_spliced)
            parts["kl"].append(kl_spliced)

            # float32 at least (float64 for a float64 model), as the losses
            dtype = kl_dtype(spliced.target.dtype)
            x, x_hat = spliced.target[keep].to(dtype), spliced.recon[keep].to(dtype)
            active = spliced.feature_acts[keep.to(spliced.feature_acts.device)] != 0
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
            variance = merged_variance([state for _, state, _ in gathered])
            fired = torch.stack([rank_fired for _, _, rank_fired in gathered]).any(0)
        result = result_of(parts, sequence_parts, variance, fired)
        if result_key is not None:
            self._results[result_key] = result.copy()
        self.last = result.copy()
        return result


class _Splice:
    """What replaces the activation in an evaluation's spliced pass: the SAE's reconstruction at the
    kept positions, the clean (target) activation elsewhere. It keeps what it computed (`recon`,
    `feature_acts` and the `target` its MSE compares against) for the metrics."""

    def __init__(self, sae: SAE[Any], keep: torch.Tensor, clean: CleanRun, from_start: bool) -> None:
        self.sae, self.keep, self.from_start = sae, keep, from_start
        self.target = clean.acts if clean.target is None else clean.target
        if not from_start:
            self.recon, self.feature_acts = self._reconstruct(clean.acts)

    def _reconstruct(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with flat_activations(self.sae):
            recon, feature_acts = reconstruct(self.sae, acts.to(self.sae.device))
        return recon.to(self.target.device, self.target.dtype), feature_acts

    def __call__(self, arriving: torch.Tensor) -> torch.Tensor:
        if self.from_start:  # LoRA before the SAE: it encodes the adapted activation, its target
            self.target = arriving
            self.recon, self.feature_acts = self._reconstruct(arriving)
        return torch.where(self.keep[..., None], self.recon, self.target)


def _next_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Each position's next token, flat; the last position of a sequence, which has none, gets its
    first token (any id: that row is dropped)."""
    return torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).flatten()
