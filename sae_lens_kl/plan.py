"""Everything `kl_finetune` resolves and checks before any work starts: hook site and width,
model name, context length, token budget, data, output folder and resume checkpoint. Bad input
fails here with one message naming the problem and the fix."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.cache import CACHE_FILENAME, CleanPassCache
from sae_lens_kl.checkpoints import (
    CHECKPOINTS_DIRNAME,
    check_resume,
    data_fingerprint,
    find_checkpoint,
    sae_fingerprint,
)
from sae_lens_kl.checks import (
    check_folder_can_be_written,
    check_head_index,
    check_sae,
    check_sae_on_model,
    check_schedule,
    check_speed_options,
    check_tensor_budget,
    check_token_ids,
    check_transcoder_options,
    decoder_unit_norm,
    downstream_hooks,
)
from sae_lens_kl.config import FALLBACK_CONTEXT_SIZE, KLFinetuneConfig
from sae_lens_kl.data import DataSource, check_data_kind
from sae_lens_kl.losses import OBJECTIVES
from sae_lens_kl.methods import SAEFinetune, method_of
from sae_lens_kl.save_dir import check_can_overwrite, holds_nothing
from sae_lens_kl.splice import (
    HookSite,
    sae_sites,
    supports_prefix_reuse,
)


@dataclass
class Plan:
    """Everything resolved and checked before any work starts."""

    cfg: KLFinetuneConfig
    site: HookSite
    write_site: HookSite
    """Where the SAE's output replaces the activation: `site`, or a transcoder's output hook."""
    context_size: int
    prepend_bos: bool
    prefix_reuse: bool
    data: DataSource
    save_dir: Path | None
    checkpoint: Path | None
    resuming_into_save_dir: bool
    fingerprints: dict[str, str]
    """Of the starting SAE and the data, recorded in checkpoints; a resume must match them."""


def make_plan(
    sae: SAE[Any],
    model: HookedRootModule,
    data: DataSource | None,
    cfg: KLFinetuneConfig,
    save_dir: str | os.PathLike[str] | None,
    resume_from: str | os.PathLike[str] | None,
    overwrite: bool,
    world_size: int = 1,
    held_out: str | None = None,
) -> Plan:
    """`held_out` names where the held-out evaluation tokens come from when not from the start of
    `data` (eval_data, a shared evaluator); it decides which sequences are trained on, so a resume
    must keep it."""
    check_sae(sae)
    check_data_kind(data)
    metadata = sae.cfg.metadata
    site, write_site = sae_sites(model, sae)
    if write_site != site:
        check_transcoder_options(cfg, data)
    check_head_index(model, site)
    # what trains (the SAE, LoRA on it, an adapter, LoRA on the LM) checks its own settings
    method = method_of(cfg, model, site.hook_name)
    method.check(sae, resumed=resume_from is not None, saved=save_dir is not None)
    check_sae_on_model(sae, model, site, write_site, cfg)
    data, cfg, cache_bos = _clean_pass_cache(data, cfg, model, site)
    cfg = dataclasses.replace(cfg, downstream_hooks=downstream_hooks(cfg, model, write_site))
    check_speed_options(cfg, model, site)
    context_size = cfg.context_size or metadata.context_size or FALLBACK_CONTEXT_SIZE
    steps = check_schedule(sae, model, cfg, context_size, resumed=resume_from is not None)
    if data is None:
        data = metadata.dataset_path
        if not data:
            raise ValueError(
                "No data given and the SAE's metadata names no dataset_path; pass data "
                "(a dataset name or object, a list of strings, or local text files)."
            )
    if isinstance(data, torch.Tensor):
        check_token_ids(data, model)
        check_tensor_budget(data, cfg, context_size, steps, held_out_of_data=held_out is None)
    out_dir, checkpoint, resuming_into_out = _output_folder(save_dir, resume_from, overwrite)
    # Everything downstream (trainer, checkpoints, reports) sees the resolved values.
    cfg = dataclasses.replace(
        cfg,
        # the decoder's own rows train only under the plain SAE fine-tune (not LoRA on them, not a
        # frozen SAE under an adapter, LM LoRA or another registered method)
        decoder_unit_norm=decoder_unit_norm(sae, cfg, trains_rows=type(method) is SAEFinetune),
        context_size=context_size,
        prepend_bos=cache_bos
        if cache_bos is not None
        else cfg.prepend_bos
        if cfg.prepend_bos is not None
        else metadata.prepend_bos is not False,
    )
    fingerprints = {
        "sae": sae_fingerprint(sae),
        "data": data_fingerprint(data),
        "held_out": held_out or "the first eval_tokens of the data",
    }
    if checkpoint is not None:
        check_resume(checkpoint, cfg, fingerprints, world_size)
    return Plan(
        cfg=cfg,
        site=site,
        write_site=write_site,
        context_size=context_size,
        prepend_bos=bool(cfg.prepend_bos),
        prefix_reuse=cfg.prefix_reuse and supports_prefix_reuse(model, site),
        data=data,
        save_dir=out_dir,
        checkpoint=checkpoint,
        resuming_into_save_dir=resuming_into_out,
        fingerprints=fingerprints,
    )


def _clean_pass_cache(
    data: DataSource | None, cfg: KLFinetuneConfig, model: HookedRootModule, site: HookSite
) -> tuple[DataSource | None, KLFinetuneConfig, bool | None]:
    """A clean-pass cache given as data (or as its folder), checked against the model and options:
    (the data, the config with the cache's context size, the cache's BOS setting or None)."""
    cache_bos = None
    if isinstance(data, (str, Path)) and (Path(data).expanduser() / CACHE_FILENAME).is_file():
        data = CleanPassCache(data)
    if isinstance(data, CleanPassCache):
        if not (cfg.prefix_reuse and supports_prefix_reuse(model, site)):
            raise ValueError(
                "Fine-tuning from a clean-pass cache needs a HookedTransformer and prefix_reuse=True."
            )
        data.check_compatible(model, site)
        if cfg.context_size not in (None, data.context_size):
            raise ValueError(
                f"context_size={cfg.context_size}, but the cache holds {data.context_size}-token "
                "sequences; leave context_size unset."
            )
        cfg = dataclasses.replace(cfg, context_size=data.context_size)
        cache_bos = data.meta["prepend_bos"]
    if isinstance(data, CleanPassCache) and OBJECTIVES[cfg.loss].takes_downstream_hooks:
        raise ValueError(
            f"loss={cfg.loss!r} compares activations after the SAE's hook, which a clean-pass cache "
            "does not store; fine-tune it from token data."
        )
    return data, cfg, cache_bos


def _output_folder(
    save_dir: str | os.PathLike[str] | None, resume_from: str | os.PathLike[str] | None, overwrite: bool
) -> tuple[Path | None, Path | None, bool]:
    """(the output folder, the checkpoint to resume from, whether that checkpoint lies in the
    output folder), the folder checked to be writable and not to hold another run's files."""
    out_dir = None if save_dir is None else Path(save_dir).expanduser()
    checkpoint = None if resume_from is None else find_checkpoint(Path(resume_from).expanduser())
    resuming_into_out = (
        checkpoint is not None and out_dir is not None and out_dir.resolve() in checkpoint.resolve().parents
    )
    if out_dir is not None:
        check_folder_can_be_written(out_dir)
        if (out_dir / CHECKPOINTS_DIRNAME).exists() and not (out_dir / CHECKPOINTS_DIRNAME).is_dir():
            raise FileExistsError(
                f"save_dir {out_dir} holds a file named {CHECKPOINTS_DIRNAME}, where the run's checkpoints "
                "go; move it, or pass another save_dir."
            )
        if not holds_nothing(out_dir) and not overwrite and not resuming_into_out:
            raise FileExistsError(
                f"save_dir {out_dir} exists and is not empty; pass overwrite=True to "
                "replace what sae_lens_kl wrote there, resume_from to continue its run, or another save_dir."
            )
        check_can_overwrite(out_dir)
    return out_dir, checkpoint, resuming_into_out
