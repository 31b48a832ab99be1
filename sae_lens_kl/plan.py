"""Everything `kl_finetune` resolves and checks before any work starts: hook site and width,
model name, context length, token budget, data, output folder and resume checkpoint. Bad input
fails here with one message naming the problem and the fix."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import TRAINER_STATE_FILENAME
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.architectures import SPARSITY_COEFFICIENT, check_supported
from sae_lens_kl.cache import CACHE_FILENAME, CleanPassCache
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.data import DataSource
from sae_lens_kl.splice import HookSite, hook_width, supports_prefix_reuse
from sae_lens_kl.trainer import FINETUNE_STATE_FILENAME

CHECKPOINTS_DIRNAME = "checkpoints"
_RESUME_MUST_MATCH = (
    "tokens",
    "loss",
    "kl_coefficient",
    "lr",
    "lr_warm_up_steps",
    "batch_size",
    "context_size",
    "prepend_bos",
    "eval_tokens",
    "exclude_special_tokens",
    "exclude_first_positions",
    "seed",
)


@dataclass
class Plan:
    """Everything resolved and checked before any work starts."""

    cfg: KLFinetuneConfig
    site: HookSite
    context_size: int
    prepend_bos: bool
    prefix_reuse: bool
    data: DataSource
    save_dir: Path | None
    checkpoint: Path | None


def make_plan(
    sae: SAE[Any],
    model: HookedRootModule,
    data: DataSource | None,
    cfg: KLFinetuneConfig,
    save_dir: str | os.PathLike[str] | None,
    resume_from: str | os.PathLike[str] | None,
    overwrite: bool,
) -> Plan:
    check_supported(sae)
    metadata = sae.cfg.metadata
    if not metadata.hook_name:
        raise ValueError(
            "The SAE's metadata has no hook_name; set sae.cfg.metadata.hook_name to the "
            "TransformerLens hook point it reads."
        )
    site = HookSite.for_model(model, metadata.hook_name, metadata.hook_head_index)
    width = hook_width(model, site)
    if width != sae.cfg.d_in:
        raise ValueError(
            f"The SAE reads {sae.cfg.d_in}-dimensional activations but {site.hook_name}"
            f"{'' if site.head_index is None else f' head {site.head_index}'} is {width} wide "
            "in this model. Pass the model the SAE was trained on."
        )
    model_cfg = getattr(model, "cfg", None)
    if cfg.check_model_name and metadata.model_name and model_cfg is not None:
        _check_model_name(metadata.model_name, model_cfg.model_name)
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
    if cfg.compile_blocks and not (
        cfg.prefix_reuse and supports_prefix_reuse(model, site) and getattr(model_cfg, "n_devices", 1) == 1
    ):
        raise ValueError(
            "compile_blocks=True compiles a HookedTransformer's blocks on one device and needs "
            "prefix_reuse=True and a hook inside a block; leave compile_blocks off for this model."
        )
    if cfg.compile_blocks and (missing := _missing_compiler(next(model.parameters()).device)):
        raise ValueError(
            f"compile_blocks=True needs torch.compile's inductor, but {missing}; install it "
            "or leave compile_blocks off."
        )
    context_size = cfg.context_size or metadata.context_size or 1024
    n_ctx = getattr(model_cfg, "n_ctx", None)
    if n_ctx is not None and context_size > n_ctx:
        raise ValueError(
            f"context_size={context_size} exceeds the model's n_ctx={n_ctx}; pass context_size<={n_ctx}."
        )
    if cfg.sparsity_controller == "on" and sae.cfg.architecture() not in SPARSITY_COEFFICIENT:
        raise ValueError(
            f"sparsity_controller='on' needs an L1 or L0 penalised SAE "
            f"({sorted(SPARSITY_COEFFICIENT)}); {sae.cfg.architecture()!r} has no sparsity coefficient."
        )
    model_device = next(model.parameters()).device
    if cfg.device is not None and torch.device(cfg.device) != model_device:
        raise ValueError(
            f"device={cfg.device!r} but the model is on {model_device}; the SAE trains on the model's "
            "device: move the model (model.to(...)) or leave device unset."
        )
    if cfg.exclude_first_positions >= context_size:
        raise ValueError(
            f"exclude_first_positions={cfg.exclude_first_positions} leaves no position of a "
            f"{context_size}-token sequence to train on; lower it or raise context_size."
        )
    tokens_per_step = cfg.batch_size * context_size
    if cfg.tokens < tokens_per_step:
        raise ValueError(
            f"tokens={cfg.tokens} is less than one batch ({cfg.batch_size} x {context_size} "
            f"= {tokens_per_step} tokens); raise tokens or lower batch_size/context_size."
        )
    if data is None:
        data = metadata.dataset_path
        if not data:
            raise ValueError(
                "No data given and the SAE's metadata names no dataset_path; pass data "
                "(a dataset name or object, a list of strings, or local text files)."
            )
    out_dir = None if save_dir is None else Path(save_dir).expanduser()
    checkpoint = None if resume_from is None else _find_checkpoint(Path(resume_from).expanduser())
    resuming_into_out = (
        checkpoint is not None and out_dir is not None and out_dir.resolve() in checkpoint.resolve().parents
    )
    if out_dir is not None and out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"save_dir {out_dir} exists and is not a folder.")
        if any(out_dir.iterdir()) and not overwrite and not resuming_into_out:
            raise FileExistsError(
                f"save_dir {out_dir} exists and is not empty; pass overwrite=True to "
                "replace its SAE files, resume_from to continue its run, or another save_dir."
            )
    # Everything downstream (trainer, checkpoints, reports) sees the resolved values.
    cfg = dataclasses.replace(
        cfg,
        context_size=context_size,
        prepend_bos=cache_bos
        if cache_bos is not None
        else cfg.prepend_bos
        if cfg.prepend_bos is not None
        else metadata.prepend_bos is not False,
    )
    if checkpoint is not None:
        _check_resume_config(checkpoint, cfg)
    return Plan(
        cfg=cfg,
        site=site,
        context_size=context_size,
        prepend_bos=bool(cfg.prepend_bos),
        prefix_reuse=cfg.prefix_reuse and supports_prefix_reuse(model, site),
        data=data,
        save_dir=out_dir,
        checkpoint=checkpoint,
    )


def _check_model_name(sae_model: str, model_name: str) -> None:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    def canonical(name: str) -> str:
        try:
            return get_official_model_name(name).split("/")[-1].lower()
        except ValueError:
            return name.split("/")[-1].lower()

    if canonical(sae_model) != canonical(model_name):
        raise ValueError(
            f"The SAE was trained on {sae_model!r} but the model is {model_name!r}. Pass "
            "the matching model, or check_model_name=False if they are the same weights."
        )


def _find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest checkpoint of a run folder."""
    if (path / TRAINER_STATE_FILENAME).is_file() and (path / FINETUNE_STATE_FILENAME).is_file():
        return path
    states = [
        *(path / CHECKPOINTS_DIRNAME).glob(f"*/{FINETUNE_STATE_FILENAME}"),
        *path.glob(f"*/{FINETUNE_STATE_FILENAME}"),
    ]
    # Folders named .partial-* are checkpoints a killed run was still writing.
    candidates = [state.parent for state in states if not state.parent.name.startswith(".")]
    if not candidates:
        raise FileNotFoundError(
            f"resume_from={path} holds no kl_finetune checkpoint (a folder with "
            f"{TRAINER_STATE_FILENAME} and {FINETUNE_STATE_FILENAME})."
        )
    return max(
        candidates,
        key=lambda p: json.loads((p / FINETUNE_STATE_FILENAME).read_text())["training_tokens"],
    )


def _missing_compiler(device: torch.device) -> str | None:
    """What inductor lacks on this device, checked before any work (it would fail at the first step)."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) is on PATH"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
    return None


def _check_resume_config(checkpoint: Path, cfg: KLFinetuneConfig) -> None:
    saved = json.loads((checkpoint / FINETUNE_STATE_FILENAME).read_text())["config"]
    current = cfg.to_dict()
    differing = [name for name in _RESUME_MUST_MATCH if saved.get(name) != current[name]]
    if differing:
        detail = ", ".join(f"{n}: checkpoint {saved.get(n)!r} vs now {current[n]!r}" for n in differing)
        raise ValueError(
            f"Cannot resume from {checkpoint}: settings differ ({detail}). Resume with "
            "the settings of the original run."
        )
