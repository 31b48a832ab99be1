"""The named checks `make_plan` runs before any work: of the SAE itself, of the SAE against the
model, and of single options. Each raises one error naming the problem and the fix."""

from __future__ import annotations

import difflib
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import SAE
from sae_lens.constants import TRAINER_STATE_FILENAME
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.adapters import attached
from sae_lens_kl.architectures import SPARSITY_COEFFICIENT, check_supported
from sae_lens_kl.cache import CACHE_FILENAME, CleanPassCache
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.data import DataError, DataSource
from sae_lens_kl.losses import OBJECTIVES, objective_of, recorded_hooks
from sae_lens_kl.splice import HookSite, hook_width, hooks_after, later_residual_hooks, supports_prefix_reuse

if TYPE_CHECKING:
    from sae_lens_kl.plan import Plan


def check_sae(sae: SAE[Any]) -> None:
    """The SAE alone: an architecture we fine-tune, finite float32+ weights, a valid k, a hook."""
    check_supported(sae)
    _check_finite(sae)
    if torch.float16 in (sae.dtype, *(parameter.dtype for parameter in sae.parameters())):
        raise ValueError(
            "The SAE is float16, whose range overflows in the fine-tune's losses (NaN within steps); "
            "fine-tune a float32 copy (sae.to(torch.float32)) and cast the result back if needed."
        )
    k = getattr(sae.cfg, "k", None)
    if isinstance(k, int) and not 0 < k <= sae.cfg.d_sae:
        raise ValueError(
            f"The SAE's k={k} must lie in [1, d_sae={sae.cfg.d_sae}] (latents kept per token); "
            "set sae.cfg.k to a value in that range."
        )
    if not sae.cfg.metadata.hook_name:
        raise ValueError(
            "The SAE's metadata has no hook_name; set sae.cfg.metadata.hook_name to the "
            "TransformerLens hook point it reads."
        )


def check_head_index(model: HookedRootModule, site: HookSite) -> None:
    n_heads = getattr(getattr(model, "cfg", None), "n_heads", None)
    if site.head_index is not None and n_heads is not None and not 0 <= site.head_index < n_heads:
        raise ValueError(
            f"The SAE's hook_head_index={site.head_index} is not a head of this model (0 to "
            f"{n_heads - 1}); pass an SAE trained on this model's heads."
        )


def check_sae_on_model(
    sae: SAE[Any], model: HookedRootModule, site: HookSite, write_site: HookSite, cfg: KLFinetuneConfig
) -> None:
    """The SAE against the model: nothing attached to it, its widths those of its hooks here, one
    device, and (when it names one) the model it was trained on."""
    if attached(sae) is not None:
        raise ValueError(
            "This SAE has an adapter attached (load_adapter); kl_finetune trains the SAE alone or a "
            "new adapter after it. Detach it first (adapter.detach(sae)), or fine-tune the SAE "
            "loaded without it."
        )
    width = hook_width(model, site)
    if width != sae.cfg.d_in:
        raise ValueError(
            f"The SAE reads {sae.cfg.d_in}-dimensional activations but {site.hook_name}"
            f"{'' if site.head_index is None else f' head {site.head_index}'} is {width} wide "
            "in this model. Pass the model the SAE was trained on."
        )
    if write_site != site and (out_width := hook_width(model, write_site)) != sae.cfg.d_out:
        raise ValueError(
            f"The transcoder writes {sae.cfg.d_out}-dimensional activations but {write_site.hook_name} "
            f"is {out_width} wide in this model. Pass the model the transcoder was trained on."
        )
    model_cfg = getattr(model, "cfg", None)
    if (n_devices := getattr(model_cfg, "n_devices", 1)) > 1:
        # TransformerLens builds such a model only with CUDA devices, so it is untested here
        raise ValueError(
            f"The model is split over n_devices={n_devices} devices, which sae_lens_kl does not support "
            "yet. Load it on one device, and to use several GPUs run data-parallel (torchrun, "
            "distributed=True: one replica per GPU)."
        )
    metadata = sae.cfg.metadata
    if cfg.check_model_name and metadata.model_name and model_cfg is not None:
        _check_model_name(metadata.model_name, model_cfg.model_name)
    elif cfg.check_model_name and model_cfg is not None:
        warnings.warn(
            f"The SAE's metadata names no model, so sae_lens_kl cannot check that it was trained on "
            f"{model_cfg.model_name!r}; its hook {metadata.hook_name!r} exists and is {sae.cfg.d_in} "
            "wide here, but an SAE from another model would fine-tune silently. Set "
            "sae.cfg.metadata.model_name (or check_model_name=False to silence this).",
            stacklevel=4,
        )


def check_transcoder_options(cfg: KLFinetuneConfig, data: DataSource | None) -> None:
    """What a transcoder's fine-tune does not support yet, refused before any work."""
    unsupported = {
        "adapter": cfg.adapter is not None,
        "sae_lora_rank": cfg.sae_lora_rank is not None,
        "lm_lora_rank": cfg.lm_lora_rank is not None,
        "a clean-pass cache as data": isinstance(data, CleanPassCache)
        or (isinstance(data, (str, Path)) and (Path(data).expanduser() / CACHE_FILENAME).is_file()),
    }
    refused = [name for name, given in unsupported.items() if given]
    if refused:
        raise ValueError(
            f"Transcoders are fine-tuned without {', '.join(refused)} (not supported for transcoders "
            "yet); fine-tune the transcoder itself from token data."
        )


def optimizer_state(folder: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The Adam state dict in a SAELens trainer checkpoint folder."""
    path = folder / TRAINER_STATE_FILENAME
    if not path.is_file():
        raise ValueError(
            f"continue_optimizer_from={str(folder)!r} holds no {TRAINER_STATE_FILENAME}; pass a SAELens "
            "trainer checkpoint folder (e.g. the MSE phase's final checkpoint)."
        )
    return torch.load(path, map_location=device, weights_only=True)["optimizer"]


def check_optimizer_state(folder: Path, sae: SAE[Any]) -> None:
    """The checkpoint's Adam moments must be those of this SAE's parameters, in order."""
    state = optimizer_state(folder)
    saved = [tuple(state["state"][i]["exp_avg"].shape) for i in sorted(state["state"])]
    ours = [tuple(parameter.shape) for parameter in sae.parameters()]
    if saved != ours:
        raise ValueError(
            f"continue_optimizer_from={str(folder)!r}: its Adam state is for parameters of shapes "
            f"{saved}, this SAE's are {ours}; pass the checkpoint of the run that trained this SAE."
        )


def same_model(a: str, b: str) -> bool:
    """Whether two model names are one model: through TransformerLens's aliases (gpt2-small =
    gpt2), and with or without the organisation (google/gemma-2-2b = gemma-2-2b)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    def canonical(name: str) -> str:
        try:
            return get_official_model_name(name).split("/")[-1].lower()
        except ValueError:  # not an official TransformerLens name (local models)
            return name.split("/")[-1].lower()

    return canonical(a) == canonical(b)


def _check_model_name(sae_model: str, model_name: str) -> None:
    if not same_model(sae_model, model_name):
        raise ValueError(
            f"The SAE was trained on {sae_model!r} but the model is {model_name!r}. Pass "
            "the matching model, or check_model_name=False if they are the same weights."
        )


def downstream_hooks(cfg: KLFinetuneConfig, model: HookedRootModule, site: HookSite) -> list[str] | None:
    """The hooks of loss 'e2e+ds', checked to exist and to come after the SAE's hook; default:
    hook_resid_post of every block from the SAE's on that comes after it (Braun et al. 2024)."""
    if not OBJECTIVES[cfg.loss].takes_downstream_hooks:
        if cfg.downstream_hooks:
            takers = [repr(name) for name, entry in OBJECTIVES.items() if entry.takes_downstream_hooks]
            raise ValueError(
                f"downstream_hooks apply to loss={' or '.join(takers)} only, not loss={cfg.loss!r}."
            )
        return None
    if cfg.downstream_hooks is None:
        hooks = later_residual_hooks(model, site.hook_name)
        if not hooks:
            raise ValueError(f"No residual hook comes after {site.hook_name}; e2e+ds needs one.")
        return hooks
    after = hooks_after(model, site.hook_name)
    for hook in cfg.downstream_hooks:
        if hook not in model.hook_dict:
            close = difflib.get_close_matches(hook, list(model.hook_dict), n=3)
            raise ValueError(f"downstream hook {hook!r} does not exist in this model; close: {close}.")
        if hook not in after:
            raise ValueError(
                f"downstream hook {hook!r} does not come after the SAE's hook {site.hook_name!r}; "
                "e2e+ds compares activations downstream of the SAE."
            )
    return list(cfg.downstream_hooks)


def _check_finite(sae: SAE[Any]) -> None:
    for name, tensor in sae.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"The SAE's {name} holds {bad} non-finite values (NaN or inf); a fine-tune would "
                "carry them into the result. Load an intact SAE (or repair those weights) first."
            )


def check_token_ids(tokens: torch.Tensor, model: HookedRootModule) -> None:
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if tokens.is_floating_point() or tokens.is_complex():
        raise DataError(f"Token data must hold integer ids, not {tokens.dtype}; pass token ids or text.")
    if tokens.numel() and (int(tokens.min()) < 0 or (d_vocab is not None and int(tokens.max()) >= d_vocab)):
        raise DataError(
            f"Token ids must lie in [0, {d_vocab}) for this model; the data holds ids from "
            f"{int(tokens.min())} to {int(tokens.max())}. Tokenize with the model's tokenizer."
        )


def decoder_unit_norm(sae: SAE[Any], cfg: KLFinetuneConfig, trains_rows: bool) -> bool:
    """Whether the fine-tune keeps decoder rows at unit norm (see KLFinetuneConfig)."""
    norms = sae.W_dec.detach().double().norm(dim=-1)
    unit = bool(((norms - 1).abs() <= 1e-4).all())
    if cfg.decoder_unit_norm is None:
        return unit and trains_rows
    if cfg.decoder_unit_norm and not trains_rows:
        raise ValueError(
            "decoder_unit_norm=True needs the SAE's decoder itself to train (not an adapter, LoRA on "
            "the LM or LoRA on the SAE, as in the paper's code); leave it unset."
        )
    if cfg.decoder_unit_norm and not unit:
        raise ValueError(
            f"decoder_unit_norm=True, but the SAE's decoder rows have norms from {norms.min():.4g} to "
            f"{norms.max():.4g}: renormalising them would change what the SAE computes. Fold the norms "
            "into the encoder first (SAELens's fold_W_dec_norm) or leave decoder_unit_norm unset."
        )
    return cfg.decoder_unit_norm


def check_tensor_budget(
    tokens: torch.Tensor, cfg: KLFinetuneConfig, context_size: int, steps: int, held_out_of_data: bool
) -> None:
    """A token tensor's rows are repacked into context_size sequences with at most one BOS between
    rows and one at each sequence's start: fewer tokens than the budget's sequences need can only
    run out, so say so before training on all of them."""
    if tokens.ndim != 2:
        return  # documents() refuses it with its own message
    held_out = -(-cfg.eval_tokens // context_size) if held_out_of_data else 0
    needed = steps * cfg.batch_size + held_out
    most = (tokens.numel() + tokens.shape[0]) // (context_size - 1)
    if most < needed:
        budget = f"tokens={cfg.tokens}" + (f" and eval_tokens={cfg.eval_tokens}" if held_out else "")
        raise DataError(
            f"The token tensor {tuple(tokens.shape)} packs into at most {most} sequences of {context_size} "
            f"tokens, but {budget} need {needed}; pass more data or lower tokens."
        )


def check_folder_can_be_written(folder: Path) -> None:
    """The folder exists or can be made: its nearest existing ancestor is a writable folder."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FileExistsError(
            f"save_dir {folder} cannot be a folder: {existing} is a file. Pass another save_dir."
        )
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"save_dir {folder}: {existing} is not writable. Pass another save_dir.")


def missing_compiler(device: torch.device) -> str | None:
    """What inductor lacks on this device, checked before any work (it would fail at the first step)."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) is on PATH"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
    return None


def check_speed_options(cfg: KLFinetuneConfig, model: HookedRootModule, site: HookSite) -> None:
    """compile_blocks and checkpoint_suffix: only where they can act."""
    model_cfg = getattr(model, "cfg", None)
    if cfg.compile_blocks and not (
        cfg.prefix_reuse and supports_prefix_reuse(model, site) and getattr(model_cfg, "n_devices", 1) == 1
    ):
        raise ValueError(
            "compile_blocks=True compiles a HookedTransformer's blocks on one device and needs "
            "prefix_reuse=True and a hook inside a block; leave compile_blocks off for this model."
        )
    if cfg.compile_blocks and (missing := missing_compiler(next(model.parameters()).device)):
        raise ValueError(
            f"compile_blocks=True needs torch.compile's inductor, but {missing}; install it "
            "or leave compile_blocks off."
        )
    if cfg.checkpoint_suffix and not (cfg.prefix_reuse and supports_prefix_reuse(model, site)):
        raise ValueError(
            "checkpoint_suffix=True recomputes a HookedTransformer's blocks after the SAE's and needs "
            "prefix_reuse=True and a hook inside a block; leave checkpoint_suffix off for this model."
        )
    if cfg.checkpoint_suffix and cfg.lm_lora_rank is not None:
        raise ValueError(
            "checkpoint_suffix=True with lm_lora_rank: LoRA acts through hooks, which are gone when "
            "backward recomputes the blocks; leave checkpoint_suffix off for LoRA on the LM."
        )


def check_schedule(
    sae: SAE[Any], model: HookedRootModule, cfg: KLFinetuneConfig, context_size: int, *, resumed: bool
) -> int:
    """The run's length, lr schedule, optimizer start, controller and device against the model and
    the SAE; returns the number of steps."""
    model_cfg = getattr(model, "cfg", None)
    n_ctx = getattr(model_cfg, "n_ctx", None)
    if n_ctx is not None and context_size > n_ctx:
        raise ValueError(
            f"context_size={context_size} exceeds the model's n_ctx={n_ctx}; pass context_size<={n_ctx}."
        )
    if cfg.continue_optimizer_from is not None and not resumed:
        check_optimizer_state(Path(cfg.continue_optimizer_from).expanduser(), sae)
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
    steps = cfg.tokens // tokens_per_step
    if cfg.lr_warm_up_steps > steps:
        raise ValueError(
            f"lr_warm_up_steps={cfg.lr_warm_up_steps} exceeds the run's {steps} steps, so the learning "
            f"rate would still be rising at the end; pass lr_warm_up_steps <= {steps}."
        )
    return steps


def check_lockstep(plans: Sequence[Plan]) -> None:
    """What several SAEs per pass need (one SAE: nothing): one clean pass from token data through
    a HookedTransformer, and no SAE-specific state (one Adam state to continue, downstream hooks
    to record, LoRA hooks on the LM)."""
    if len(plans) < 2:
        return
    cfg = plans[0].cfg
    if cfg.continue_optimizer_from is not None:
        raise ValueError(
            "continue_optimizer_from holds one SAE's Adam state; fine-tune the SAEs one at a time."
        )
    if (
        not all(plan.prefix_reuse for plan in plans)
        or isinstance(plans[0].data, CleanPassCache)
        or recorded_hooks(objective_of(cfg))
        or cfg.lm_lora_rank is not None
    ):
        raise ValueError(
            "Several SAEs per pass need a HookedTransformer, prefix_reuse=True, token data "
            "(fine-tune from a clean-pass cache one SAE at a time), a loss without downstream "
            "hooks and no LoRA on the LM (fine-tune e2e+ds or lm_lora_rank one SAE at a time)."
        )
