"""Every check before SAEBench runs: eval names, SAE names and widths, one model and hook, the
output folder, config overrides, absorption's hook and prompt position, core's text."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_lens_kl.checks import same_model
from sae_lens_kl.data import DataSource, _local_files, documents
from sae_lens_kl.saebench.specs import KNOWN_EVALS, NEEDS_HUB, OFFLINE_EVALS, SAEBenchError, sae_bench_module


def check_evals(evals: Sequence[str]) -> list[str]:
    """The evals asked for, in order; unknown or hub-only names are refused with what they need."""
    evals = list(evals)
    if not evals:
        raise SAEBenchError(f"No evals given; choose from {', '.join(OFFLINE_EVALS)}.")
    unknown = [name for name in evals if name not in KNOWN_EVALS]
    if unknown:
        raise SAEBenchError(f"Unknown eval {', '.join(unknown)}; known evals: {', '.join(KNOWN_EVALS)}.")
    for name in evals:
        if name in NEEDS_HUB:
            raise SAEBenchError(
                f"Eval {name} needs {NEEDS_HUB[name]}, which this package cannot fetch or check "
                f"offline, so it does not run it; run SAEBench's own `python -m sae_bench.evals."
                f"{'scr_and_tpp' if name in ('scr', 'tpp') else name}.main` where those are "
                f"available. Offline evals: {', '.join(OFFLINE_EVALS)}."
            )
    if len(set(evals)) != len(evals):
        raise SAEBenchError(f"An eval is named twice in {evals}.")
    return evals


def check_names(saes: Mapping[str, Any]) -> None:
    if not saes:
        raise SAEBenchError("No SAEs given: pass {'before': sae, 'after': tuned, ...}.")
    for name in saes:
        if not name or any(c in name for c in "/\\=:") or name.startswith("."):
            raise SAEBenchError(
                f"SAE name {name!r} cannot name result files; use letters, digits, '-', '_' (e.g. before)."
            )


def check_out(out_dir: str | os.PathLike[str]) -> Path:
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise SAEBenchError(f"Output folder {path} is a file; pass a folder.")
    return path


def check_saes(saes: Mapping[str, SAE[Any]], model_name: str | None) -> str:
    """All SAEs read the same hook of the same model; returns that hook."""
    hooks = {name: sae.cfg.metadata.hook_name for name, sae in saes.items()}
    if len(set(hooks.values())) != 1:
        raise SAEBenchError(
            f"The SAEs read different hooks ({hooks}); SAEBench before/after compares SAEs at one hook."
        )
    for name, sae in saes.items():
        sae_model = sae.cfg.metadata.model_name
        if model_name is not None and sae_model is not None and not same_model(sae_model, model_name):
            raise SAEBenchError(
                f"SAE {name!r} was trained on model {sae_model!r}, not {model_name!r}; pass its model."
            )
    hook = next(iter(hooks.values()))
    if hook is None:
        raise SAEBenchError("The SAEs' metadata name no hook (cfg.metadata.hook_name); set it.")
    return hook


def check_width(saes: Mapping[str, SAE[Any]], model: HookedTransformer, hook: str) -> None:
    """The SAEs read activations as wide as the model's at their hook (one token's forward)."""
    if hook not in model.hook_dict:
        raise SAEBenchError(f"The model has no hook {hook!r}; the SAEs belong to another model.")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device), names_filter=[hook]
        )
    shape = cache[hook].shape
    for name, sae in saes.items():
        width = shape[-1] if sae.cfg.metadata.hook_head_index is not None else math.prod(shape[2:])
        if sae.cfg.d_in != width:
            raise SAEBenchError(
                f"SAE {name!r} reads {sae.cfg.d_in} dimensions; {model.cfg.model_name} has {width} at "
                f"{hook}: it belongs to another model."
            )


def check_configs(evals: Sequence[str], configs: Mapping[str, Mapping[str, Any]]) -> None:
    """Each override names a field of that eval's SAEBench config class."""
    for name, overrides in configs.items():
        if name not in evals:
            raise SAEBenchError(
                f"Settings given for eval {name!r}, which is not among the evals {list(evals)}."
            )
        spec = OFFLINE_EVALS[name]
        config_class = getattr(sae_bench_module(spec.config_module), spec.config_class)
        known = set(inspect.signature(config_class).parameters)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SAEBenchError(f"{spec.config_class} has no field {unknown}; its fields: {sorted(known)}.")


def check_absorption(model: HookedTransformer, hook: str, overrides: Mapping[str, Any]) -> None:
    """SAEBench trains its first-letter probes at blocks.L.hook_resid_post and reads the word at a
    fixed position before the prompt's end: refuse what would silently compare the wrong things."""
    parts = hook.split(".")
    if not (
        len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == "hook_resid_post"
    ):
        raise SAEBenchError(
            f"absorption needs SAEs at blocks.L.hook_resid_post (SAEBench trains its probes there); "
            f"these read {hook}. Leave absorption out of the evals."
        )
    if model.tokenizer is None:
        raise SAEBenchError(
            "absorption builds its tasks from the tokenizer's vocabulary; the model has none."
        )
    config_module = sae_bench_module("sae_bench.evals.absorption.eval_config")
    defaults = config_module.AbsorptionEvalConfig()
    template = overrides.get("prompt_template", defaults.prompt_template)
    position = overrides.get("prompt_token_pos", defaults.prompt_token_pos)
    suffix = template.split("{word}", 1)[1]
    suffix_tokens = len(model.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if position != -(suffix_tokens + 1):
        raise SAEBenchError(
            f"absorption reads the word at position {position}, but this tokenizer splits the prompt's "
            f"end {suffix!r} into {suffix_tokens} tokens, so the word is at {-(suffix_tokens + 1)}: pass "
            f"configs={{'absorption': {{'prompt_token_pos': {-(suffix_tokens + 1)}}}}}."
        )


def core_dataset(data: DataSource) -> Any:
    """core's text as a datasets.Dataset (SAELens's ActivationsStore reads it), or a hub name."""
    import datasets

    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        return data
    if isinstance(data, str) and _local_files(data) is None:
        return data  # a hub dataset name: SAELens loads it
    texts = list(documents(data))
    if not texts:
        raise SAEBenchError(f"core's data {data!r} holds no text.")
    if isinstance(texts[0], torch.Tensor):
        return datasets.Dataset.from_dict({"input_ids": [t.tolist() for t in texts]})
    return datasets.Dataset.from_dict({"text": texts})
