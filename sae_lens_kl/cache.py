"""A cached clean pass ("amortised KL"): run the model once over a token budget and store what a
KL fine-tune needs to skip the clean forward pass afterwards, exactly.

Per token it stores, in the model's dtype: the residual stream entering the SAE's block (the
suffix restarts from it) and the activation at the hook point when that is not the same tensor.
For the clean next-token distribution it stores, exactly (no top-k logit approximation), either
  - "statistics" (float32 linear unembedding, no softcap): W_U p, b_U . p and sum p log p of the
    clean distribution p (kl.CleanStatistics), from which KL(p || q) and its gradient follow
    exactly given only the spliced logits; a step from the cache then forms no clean logits; or
  - "final" (otherwise): the unembedding input after the final norm, from which the clean logits
    are recomputed with the model's own unembedding.
Fine-tuning from a cache runs only the spliced suffix, the SAE and the unembedding; any number of
SAEs at that hook, for any number of epochs, can reuse one cache.

Disk format (version 2; version 1 caches, which always hold "final", are still read), a folder:
  cache.json               model name, hook, block, context size, BOS, dtype, d_model, d_in,
                           clean_distribution ("statistics" | "final"), shard names, total
                           sequences (written last)
  shard_00000.safetensors  tokens [n, seq] int64; residual [n, seq, d_model]; acts [n, seq, d_in]
                           (absent for hook_resid_pre, where it equals residual); then either
                           clean_unembed_mean [n, seq, d_model], clean_bias_mean [n, seq],
                           clean_neg_entropy [n, seq] (float32; float64 for a float64 model),
                           or final [n, seq, d_model]
Shards are written in a temporary folder and renamed into place, cache.json last, so an
interrupted build is never mistaken for a complete cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_kl.config import FALLBACK_CONTEXT_SIZE, KL_CHUNK_TOKENS
from sae_lens_kl.data import DataSource, take, token_sequences
from sae_lens_kl.kl import CleanStatistics, clean_statistics
from sae_lens_kl.runs import CleanRun, SpliceRunner
from sae_lens_kl.splice import HookSite, linear_layout
from sae_lens_kl.staging import staged_files

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CACHE_FILENAME = "cache.json"
STATISTICS_FIELDS = ("clean_unembed_mean", "clean_bias_mean", "clean_neg_entropy")


def _stores_acts(hook_name: str) -> bool:
    return not hook_name.endswith("hook_resid_pre")


def estimate_bytes(
    model: HookedTransformer, site: HookSite, d_in: int, n_tokens: int, statistics: bool
) -> int:
    per_token = model.cfg.d_model + (d_in if _stores_acts(site.hook_name) else 0)
    element = torch.empty((), dtype=model.cfg.dtype).element_size()
    clean = (model.cfg.d_model + 2) * 4 if statistics else model.cfg.d_model * element
    return n_tokens * (per_token * element + clean + 8)


def build_cache(
    model: HookedTransformer,
    data: DataSource,
    hook_name: str,
    out_dir: str | os.PathLike[str],
    *,
    tokens: int,
    context_size: int = FALLBACK_CONTEXT_SIZE,
    prepend_bos: bool = True,
    hook_head_index: int | None = None,
    batch_size: int = 8,
    shard_sequences: int = 256,
    chunk_tokens: int = KL_CHUNK_TOKENS,
    overwrite: bool = False,
) -> CleanPassCache:
    """Run `model` once over the first `tokens` tokens of `data` and store the clean pass
    (`chunk_tokens`: tokens per vocabulary-sized chunk when forming the clean statistics)."""
    site = HookSite.for_model(model, hook_name, hook_head_index)
    if not isinstance(model, HookedTransformer) or site.block is None:
        raise ValueError("A clean-pass cache needs a HookedTransformer and a hook inside a block.")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True or another folder.")
    n_seq = tokens // context_size
    if n_seq < 1:
        raise ValueError(f"tokens={tokens} is less than one sequence of {context_size} tokens.")
    sequences = take(token_sequences(data, model, context_size, prepend_bos), n_seq)
    if sequences is None:
        raise ValueError(f"The data holds fewer than {n_seq} sequences of {context_size} tokens.")
    runner = SpliceRunner(model, site)
    probe_width = runner.clean_run(sequences[:1, :2]).acts.shape[-1]
    statistics = runner.projection.supports_statistics
    size = estimate_bytes(model, site, probe_width, n_seq * context_size, statistics)
    print(
        f"clean-pass cache: {n_seq} sequences x {context_size} tokens at {hook_name}, about "
        f"{size / 2**30:.2f} GiB on disk in {out}"
    )

    shards: list[str] = []
    # cache.json is renamed into place last: a folder without it is never read as a cache.
    with staged_files(out, last=CACHE_FILENAME) as staging:
        clean_fields = STATISTICS_FIELDS if statistics else ("final",)
        pending: dict[str, list[torch.Tensor]] = {
            name: [] for name in ("tokens", "residual", "acts", *clean_fields)
        }

        def flush() -> None:
            if not pending["tokens"]:
                return
            tensors = {name: torch.cat(parts).contiguous() for name, parts in pending.items() if parts}
            name = f"shard_{len(shards):05d}.safetensors"
            save_file(tensors, staging / name)
            shards.append(name)
            for parts in pending.values():
                parts.clear()

        # the LM's weights in the layout TransformerLens copies them into (splice.linear_layout)
        with torch.no_grad(), linear_layout(model):
            for batch in tqdm(sequences.split(batch_size), desc="Caching clean pass"):
                run = runner.clean_run(batch)
                assert run.prefix is not None and run.final is not None
                pending["tokens"].append(run.tokens.cpu())
                pending["residual"].append(run.prefix.residual.cpu())
                if _stores_acts(hook_name):
                    pending["acts"].append(run.acts.cpu())
                if statistics:
                    stats = clean_statistics(run.final, runner.projection, chunk_tokens)
                    pending["clean_unembed_mean"].append(stats.unembed_mean.cpu())
                    pending["clean_bias_mean"].append(stats.bias_mean.cpu())
                    pending["clean_neg_entropy"].append(stats.neg_entropy.cpu())
                else:
                    pending["final"].append(run.final.cpu())
                if sum(len(t) for t in pending["tokens"]) >= shard_sequences:
                    flush()
            flush()
        meta = {
            "format_version": FORMAT_VERSION,
            "model_name": model.cfg.model_name,
            "hook_name": hook_name,
            "hook_head_index": hook_head_index,
            "block": site.block,
            "context_size": context_size,
            "prepend_bos": prepend_bos,
            "dtype": str(model.cfg.dtype).removeprefix("torch."),
            "d_model": model.cfg.d_model,
            "d_in": probe_width,
            "clean_distribution": "statistics" if statistics else "final",
            "n_sequences": n_seq,
            "shards": shards,
        }
        (staging / CACHE_FILENAME).write_text(json.dumps(meta, indent=2))
    return CleanPassCache(out)


class CleanPassCache:
    """A finished clean-pass cache folder, read in order, shard by shard."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        meta_path = self.path / CACHE_FILENAME
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a finished clean-pass cache (no {CACHE_FILENAME}); "
                "build one with sae_lens_kl.cache.build_cache or `sae-lens-kl cache`."
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{self.path}: cache format {self.meta.get('format_version')} is not one of "
                f"{READABLE_VERSIONS}; rebuild it with this version of sae_lens_kl."
            )

    @property
    def hook_name(self) -> str:
        return self.meta["hook_name"]

    @property
    def context_size(self) -> int:
        return self.meta["context_size"]

    @property
    def n_sequences(self) -> int:
        return self.meta["n_sequences"]

    def check_compatible(self, model: HookedTransformer, site: HookSite) -> None:
        if (site.hook_name, site.head_index) != (self.hook_name, self.meta["hook_head_index"]):
            raise ValueError(
                f"The cache {self.path} holds {self.hook_name!r} (head "
                f"{self.meta['hook_head_index']}), not the SAE's {site.hook_name!r} "
                f"(head {site.head_index}); build a cache for that hook."
            )
        if self.meta["model_name"] != model.cfg.model_name or self.meta["d_model"] != model.cfg.d_model:
            raise ValueError(
                f"The cache {self.path} was built with model {self.meta['model_name']!r}, "
                f"not {model.cfg.model_name!r}."
            )

    def runs(
        self,
        runner: SpliceRunner,
        batch_size: int,
        first_sequence: int = 0,
        consumed: int = 0,
        part: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
    ) -> Iterator[CleanRun]:
        """The clean runs of `batch_size` cached sequences from `first_sequence` on (the ones before
        are held out), epoch after epoch, on the runner's device, each with the prefix its spliced
        suffix restarts from; a resumed run passes the sequences it `consumed` already. `part`
        takes a data-parallel rank's sequences of each batch."""
        self.check_compatible(runner.model, runner.site)  # type: ignore[arg-type]
        per_epoch = (self.n_sequences - first_sequence) // batch_size * batch_size
        if per_epoch <= 0:
            raise ValueError(
                f"The cache {self.path} holds {self.n_sequences} sequences: none left for a "
                f"batch of {batch_size} after {first_sequence} held-out ones."
            )
        start = first_sequence + consumed % per_epoch
        device = next(runner.model.parameters()).device
        while True:
            for batch in self._batches(batch_size, start, first_sequence + per_epoch):
                tokens, residual, acts = (part(tensor) for tensor in batch[:3])
                clean = batch[3]
                clean = (
                    CleanStatistics(*(part(getattr(clean, f.name)) for f in dataclasses.fields(clean)))
                    if isinstance(clean, CleanStatistics)
                    else part(clean)
                )
                tokens = tokens.to(device)
                prefix = runner.prefix_from(tokens, residual.to(device))
                if isinstance(clean, CleanStatistics):
                    yield CleanRun(tokens, acts.to(device), prefix, statistics=clean.to(device))
                else:
                    yield CleanRun(tokens, acts.to(device), prefix, final=clean.to(device))
            start = first_sequence

    def _batches(
        self, batch_size: int, start: int, stop: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | CleanStatistics]]:
        """(tokens, residual, acts, clean distribution) of each batch of sequences [start, stop)."""
        statistics = self.meta.get("clean_distribution", "final") == "statistics"
        fields = ("tokens", "residual", "acts", *(STATISTICS_FIELDS if statistics else ("final",)))
        pending: list[dict[str, torch.Tensor]] = []
        offset = 0
        for shard in self.meta["shards"]:
            with safe_open(self.path / shard, framework="pt") as handle:
                count = handle.get_slice("tokens").get_shape()[0]
                lo, hi = max(start - offset, 0), min(stop - offset, count)
                if lo < hi:
                    names = set(handle.keys())
                    pending.append(
                        {
                            name: handle.get_slice(name if name in names else "residual")[lo:hi]
                            for name in fields
                        }
                    )
            offset += count
            while sum(len(part["tokens"]) for part in pending) >= batch_size:
                merged = {name: torch.cat([part[name] for part in pending]) for name in fields}
                batch = [merged[name][:batch_size] for name in fields]
                yield (*batch[:3], CleanStatistics(*batch[3:]) if statistics else batch[3])
                rest = {name: merged[name][batch_size:] for name in fields}
                pending = [rest] if len(rest["tokens"]) else []

    def tokens(self, count: int) -> torch.Tensor:
        """The first `count` cached token sequences [count, seq]."""
        parts: list[torch.Tensor] = []
        for shard in self.meta["shards"]:
            with safe_open(self.path / shard, framework="pt") as handle:
                parts.append(handle.get_tensor("tokens"))
            if sum(len(p) for p in parts) >= count:
                break
        return torch.cat(parts)[:count]
