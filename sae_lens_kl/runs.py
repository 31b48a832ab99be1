"""One batch's clean run, and the spliced run that continues from it.

The training step has one shape whatever feeds it: it receives a `CleanRun` (tokens, the SAE's
clean input, where the suffix restarts, the clean next-token distribution) and runs the spliced
suffix from it. A CleanRun comes from the online clean pass (`SpliceRunner.clean_run`), from a
clean-pass cache (cache.py), or from one clean pass shared by several SAEs (`shared_clean_runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule, HookPoint

from sae_lens_kl.config import KL_CHUNK_TOKENS
from sae_lens_kl.kl import CleanStatistics, clean_statistics
from sae_lens_kl.splice import (
    CompiledBlocks,
    HookSite,
    Prefix,
    cached_prefix,
    embedded_prefix,
    run_prefix,
    run_to_hook,
    run_to_output,
    supports_prefix_reuse,
)
from sae_lens_kl.vocab import VocabProjection


@dataclass
class CleanRun:
    """One batch of the clean forward pass, as the training step needs it.

    tokens [batch, pos]; acts [batch, pos, d_in], the SAE's clean input; prefix, the state entering
    the SAE's block that the spliced suffix restarts from (None for models that run two full
    forwards); the clean distribution as run outputs (`final`: unembedding inputs, or logits
    without a prefix) or as `statistics`, or neither when no loss term needs it (MSE only).
    """

    tokens: torch.Tensor
    acts: torch.Tensor
    prefix: Prefix | None
    final: torch.Tensor | None = None
    statistics: CleanStatistics | None = None
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)
    """Clean activations [batch, pos, ...] at further hooks a loss term reads (`LossTerm.hooks`)."""
    target: torch.Tensor | None = None
    """A transcoder's clean activation at its output hook [batch, pos, d_out], which its output
    replaces and its MSE compares against (None for an SAE: `acts` is both)."""

    def __post_init__(self) -> None:
        if self.final is not None and self.statistics is not None:
            raise ValueError("A CleanRun holds the clean distribution as one of final, statistics.")

    def clean_rows(self, rows: torch.Tensor) -> torch.Tensor | CleanStatistics:
        """The clean distribution of the [batch, pos] tokens, flattened, at `rows`."""
        if self.statistics is not None:
            return self.statistics.rows(rows)
        if self.final is None:
            raise ValueError("This clean run holds no clean distribution (it was run for MSE only).")
        return self.final.flatten(0, 1)[rows]

    def numel(self) -> int:
        return self.tokens.numel()


def position_mask(
    tokens: torch.Tensor, special_token_ids: Sequence[int], exclude_first_positions: int
) -> torch.Tensor:
    """[batch, pos] True where the SAE's reconstruction replaces the activation and losses count."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    if special_token_ids:
        keep &= ~torch.isin(tokens, torch.tensor(list(special_token_ids), device=tokens.device))
    keep[:, :exclude_first_positions] = False
    return keep


class SpliceRunner:
    """Runs one SAE's clean and spliced passes through `model`: from the prefix entering the SAE's
    block when the model allows it (the layers before run once per batch), else as two full hooked
    forwards. `projection` maps its run outputs to logits. The SAE reads at `site` and its output
    replaces the activation at `write_site` (default `site`; a transcoder's output hook)."""

    def __init__(
        self,
        model: HookedRootModule,
        site: HookSite,
        *,
        write_site: HookSite | None = None,
        prefix_reuse: bool = True,
        blocks: CompiledBlocks | None = None,
        spliced_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
        spliced_from_start: bool = False,
        checkpoint_suffix: bool = False,
    ) -> None:
        self.model = model
        self.site = site
        self.write_site = write_site or site
        # what else the spliced model has besides the SAE (LoRA on the LM's blocks)
        self.spliced_hooks = list(spliced_hooks)
        # whether those hooks act before the SAE's block, so that the spliced model's activation
        # at the SAE's hook differs from the clean one: the spliced pass then runs from the
        # embedding (not the clean prefix) and the SAE must encode what arrives there
        self.spliced_from_start = spliced_from_start
        self.checkpoint_suffix = checkpoint_suffix
        self.prefix_reuse = prefix_reuse and supports_prefix_reuse(model, site)
        self.blocks = blocks if self.prefix_reuse else None
        self.projection = VocabProjection.for_run(model, self.prefix_reuse)

    @torch.no_grad()
    def clean_run(
        self, tokens: torch.Tensor, with_distribution: bool = True, record: Sequence[str] = ()
    ) -> CleanRun:
        """The clean pass of a [batch, pos] token batch, recording the activations at the hooks
        in `record`; without the distribution it stops at the SAE's block (the MSE-only control
        needs nothing after it)."""
        model, site, write = self.model, self.site, self.write_site
        tokens = tokens.to(next(model.parameters()).device)
        transcoder = write != site
        with recording(model, [*record, write.hook_name] if transcoder else record) as recorded:
            prefix = run_prefix(model, tokens, site, self.blocks) if self.prefix_reuse else None  # type: ignore[arg-type]
            if with_distribution:
                final, acts = run_to_output(model, tokens, prefix, site)
            else:
                final, acts = None, run_to_hook(model, tokens, prefix, site, write.block)
        target = write.read(recorded[write.hook_name]) if transcoder else None
        if transcoder and write.hook_name not in record:
            del recorded[write.hook_name]
        return CleanRun(tokens, acts, prefix, final=final, recorded=recorded, target=target)

    def clean_runs(
        self, batches: Iterable[torch.Tensor], with_distribution: bool = True, record: Sequence[str] = ()
    ) -> Iterator[CleanRun]:
        for tokens in batches:
            yield self.clean_run(tokens, with_distribution, record)

    def prefix_from(self, tokens: torch.Tensor, residual: torch.Tensor) -> Prefix:
        """The prefix of a stored residual entering the SAE's block (a clean-pass cache)."""
        assert isinstance(self.model, HookedTransformer)
        return cached_prefix(self.model, tokens, residual, self.site, self.blocks)

    def spliced_output(
        self,
        run: CleanRun,
        replacement: Callable[[torch.Tensor], torch.Tensor],
        record: Sequence[str] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run output [batch, pos, d] with the hook's activation replaced by `replacement(acts)`,
        continuing from the clean run's prefix, and the activations at the hooks in `record`;
        gradients flow into what `replacement` returns."""
        with recording(self.model, record) as recorded, hooks_on(self.model, self.spliced_hooks):
            prefix = run.prefix
            if self.spliced_from_start and prefix is not None:
                prefix = embedded_prefix(self.model, run.tokens, self.site, self.blocks)  # type: ignore[arg-type]
            if self.checkpoint_suffix and prefix is not None:  # the blocks after the splice's
                prefix = replace(prefix, checkpoint_from=self.write_site.block + 1)  # type: ignore[operator]
            output = run_to_output(self.model, run.tokens, prefix, self.write_site, replacement)[0]
        return output, recorded


@contextmanager
def hooks_on(model: HookedRootModule, hooks: Sequence[tuple[str, Callable[..., Any]]]) -> Iterator[None]:
    """`hooks` registered inside the block (no hook context at all when there are none)."""
    if not hooks:
        yield
        return
    with model.hooks(fwd_hooks=list(hooks)):
        yield


@contextmanager
def recording(model: HookedRootModule, hooks: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Yields a dict that the forward passes inside the block fill with the activations at `hooks`
    (no hook context at all when there are none: the common case costs nothing)."""
    recorded: dict[str, torch.Tensor] = {}
    if not hooks:
        yield recorded
        return

    def record(raw: torch.Tensor, hook: HookPoint, name: str) -> torch.Tensor:  # noqa: ARG001
        # keyed by the name asked for: a TransformerBridge's hook point may carry another name
        recorded[name] = raw
        return raw

    with model.hooks(fwd_hooks=[(hook, _bind(record, name=hook)) for hook in hooks]):
        yield recorded


@torch.no_grad()
def shared_clean_runs(
    model: HookedTransformer,
    batches: Iterator[torch.Tensor],
    runners: Mapping[str, SpliceRunner],
    chunk_tokens: int = KL_CHUNK_TOKENS,
) -> Iterator[dict[str, CleanRun]]:
    """For each token batch, every SAE's clean run from one prefix and one clean suffix: the layers
    before the earliest SAE run once, and one suffix from there records, for each SAE, the residual
    entering its block and its input. Blocks holding a recording hook run eagerly, the others
    through the runners' compiled blocks when they have them.

    The clean distribution is the same for every SAE. From three SAEs on, and when the
    unembedding allows it, it is handed over as CleanStatistics formed once per batch (two
    unembedding products, chunks of `chunk_tokens`) instead of each SAE forming the clean logits
    again (one product each): the same KL and gradients up to float rounding."""
    sites = {name: runner.site for name, runner in runners.items()}
    # a transcoder's clean output at its output hook: what its reconstruction replaces
    writes = {name: runner.write_site for name, runner in runners.items() if runner.write_site != runner.site}
    earliest = min(runners.values(), key=lambda runner: runner.site.block or 0)
    sae_blocks = sorted({site.block for site in sites.values() if site.block is not None})
    residuals: dict[int, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}

    def keep_residual(raw: torch.Tensor, hook: HookPoint, block: int) -> torch.Tensor:  # noqa: ARG001
        residuals[block] = raw
        return raw

    def keep_acts(raw: torch.Tensor, hook: HookPoint, name: str) -> torch.Tensor:  # noqa: ARG001
        acts[name] = sites[name].read(raw)
        return raw

    def keep_target(raw: torch.Tensor, hook: HookPoint, name: str) -> torch.Tensor:  # noqa: ARG001
        targets[name] = writes[name].read(raw)
        return raw

    hooks = [(f"blocks.{block}.hook_resid_pre", _bind(keep_residual, block=block)) for block in sae_blocks]
    hooks += [(site.hook_name, _bind(keep_acts, name=name)) for name, site in sites.items()]
    hooks += [(site.hook_name, _bind(keep_target, name=name)) for name, site in writes.items()]
    share_statistics = len(sites) >= 3 and earliest.projection.supports_statistics
    for tokens in batches:
        tokens = tokens.to(model.cfg.device)
        prefix = run_prefix(model, tokens, earliest.site, earliest.blocks)
        with model.hooks(fwd_hooks=hooks):
            final = run_to_output(model, tokens, prefix, earliest.site)[0]
        clean: dict[str, Any] = (
            {"statistics": clean_statistics(final, earliest.projection, chunk_tokens)}
            if share_statistics
            else {"final": final}
        )
        yield {
            name: CleanRun(
                tokens,
                acts[name],
                replace(prefix, residual=residuals[site.block], start_layer=site.block),  # type: ignore[index,arg-type]
                target=targets.get(name),
                **clean,
            )
            for name, site in sites.items()
        }


def _bind(function: Any, **bound: Any) -> Any:
    """A TransformerLens hook (called as f(tensor, hook=...)) with extra arguments bound."""
    return lambda raw, hook: function(raw, hook, **bound)
