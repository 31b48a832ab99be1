"""A transcoder set in circuit-tracer's local format (circuit-tracer 0.5.0), and back.

The format (circuit_tracer/utils/hf_utils.py and transcoder/single_layer_transcoder.py of 0.5.0):
a folder with `config.yaml` (`model_kind: transcoder_set`, `feature_input_hook` and
`feature_output_hook` as hook names relative to `blocks.{layer}.`, `scan`, `transcoders`: one file
per layer, the list index is the layer) and `layer_{i}.safetensors` holding `W_enc` [d_sae,
d_model], `W_dec` [d_sae, d_model], `b_enc` [d_sae], `b_dec` [d_model], optionally `W_skip`
[d_out, d_in] and, for JumpReLU, `activation_function.threshold` [d_sae] (its presence alone
picks JumpReLU over ReLU; extra keys are refused by its strict load). Its loader needs layers 0 ..
n−1 and silently treats a missing layer as all error nodes, so the export insists on a transcoder
for every layer from 0 (and, given the model, for every layer of it). `load_transcoder_from_hub`
reads such a folder by its absolute path, offline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from sae_lens import SAE
from sae_lens.registry import get_sae_class
from sae_lens.saes.transcoder import JumpReLUTranscoder, SkipTranscoder, Transcoder
from safetensors.torch import load_file, save_file

from sae_lens_kl.staging import staged_folder

CIRCUIT_TRACER_VERSION = "0.5.0"
CONFIG_FILENAME = "config.yaml"
_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def export_circuit_tracer(
    transcoders: Sequence[SAE[Any]],
    out_dir: str | os.PathLike[str],
    *,
    n_layers: int | None = None,
    scan: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `transcoders` (SAELens ReLU or JumpReLU transcoders, with or without skip, one per
    layer from 0) as a circuit-tracer transcoder set in `out_dir`, all files at once (staged, then
    renamed in). `n_layers`: the model's layer count, checked against the set. `scan`: the set's
    name in circuit-tracer's graphs (default: the model name and the hooks)."""
    in_hook, out_hook = check_exportable(transcoders, n_layers)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it.")
        if not _our_export(out):
            raise FileExistsError(
                f"{out} holds files that are not a transcoder set this package exported; overwrite "
                "replaces only those. Choose an empty or new folder."
            )
    model_name = transcoders[0].cfg.metadata.model_name or "unknown-model"
    files = [f"layer_{layer}.safetensors" for layer in range(len(transcoders))]
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": in_hook,
        "feature_output_hook": out_hook,
        "model_name": model_name,
        "scan": scan or f"{model_name}/{in_hook}->{out_hook}",
        # file names relative to this folder: load_transcoder_from_hub(<absolute folder>) globs them
        "transcoders": files,
        "exported_by": f"sae_lens_kl for circuit-tracer {CIRCUIT_TRACER_VERSION}",
    }
    with staged_folder(out) as staging:
        for name, transcoder in zip(files, transcoders, strict=True):
            save_file(_tensors(transcoder), str(staging / name))
        (staging / CONFIG_FILENAME).write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def _our_export(folder: Path) -> bool:
    """Whether `folder` holds only an export of ours (its config says so; no other entries)."""
    try:
        config = yaml.safe_load((folder / CONFIG_FILENAME).read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(config, dict) or not str(config.get("exported_by", "")).startswith("sae_lens_kl"):
        return False
    ours = {CONFIG_FILENAME, *map(str, config.get("transcoders", []))}
    return {entry.name for entry in folder.iterdir()} <= ours


def check_exportable(transcoders: Sequence[SAE[Any]], n_layers: int | None = None) -> tuple[str, str]:
    """(feature_input_hook, feature_output_hook) of a set circuit-tracer 0.5.0 reads as SAELens
    computes it; one clear error otherwise, before anything is written."""
    if not transcoders:
        raise ValueError("No transcoders to export; pass one per layer.")
    suffixes, layers = set(), []
    for transcoder in transcoders:
        kind = transcoder.cfg.architecture()
        if not isinstance(transcoder, Transcoder):
            raise ValueError(
                f"A {kind} SAE is not a transcoder; circuit-tracer {CIRCUIT_TRACER_VERSION} reads ReLU and "
                "JumpReLU transcoders (SAELens's transcoder, skip_transcoder, jumprelu_transcoder, "
                "jumprelu_skip_transcoder)."
            )
        if getattr(transcoder.cfg, "normalize_activations", "none") != "none":
            raise ValueError(
                f"The {kind} normalises its input ({transcoder.cfg.normalize_activations}), which "
                "circuit-tracer's format cannot express; fold the normalisation into the weights first."
            )
        if isinstance(transcoder, JumpReLUTranscoder) and bool((transcoder.threshold < 0).any()):
            raise ValueError(
                "A JumpReLU threshold is negative: circuit-tracer computes x * (x > threshold), SAELens "
                "relu(x) * (x > threshold), equal only for thresholds >= 0."
            )
        hooks = [_LAYER_HOOK.match(transcoder.cfg.metadata.hook_name or "")]
        hooks.append(_LAYER_HOOK.match(getattr(transcoder.cfg.metadata, "hook_name_out", None) or ""))
        if None in hooks or hooks[0].group(1) != hooks[1].group(1):  # type: ignore[union-attr]
            raise ValueError(
                "circuit-tracer's transcoders read and write inside one block (blocks.L.<hook>); this "
                f"one reads {transcoder.cfg.metadata.hook_name} and writes "
                f"{getattr(transcoder.cfg.metadata, 'hook_name_out', None)}."
            )
        layers.append(int(hooks[0].group(1)))  # type: ignore[union-attr]
        suffixes.add((hooks[0].group(2), hooks[1].group(2)))  # type: ignore[union-attr]
    if len(suffixes) > 1:
        raise ValueError(
            f"The set mixes hooks {sorted(suffixes)}; circuit-tracer takes one input and one output hook."
        )
    expected = list(range(n_layers if n_layers is not None else len(transcoders)))
    if layers != expected:
        raise ValueError(
            f"The transcoders are at layers {layers}; circuit-tracer needs one for every layer from 0, in "
            f"order ({expected}): it would treat a missing layer as all error nodes."
        )
    widths = {(t.cfg.d_in, t.cfg.d_sae, t.cfg.d_out) for t in transcoders}
    if len(widths) > 1:
        raise ValueError(
            f"The transcoders have different widths (d_in, d_sae, d_out) {sorted(widths)}; the format "
            "needs one."
        )
    return suffixes.pop()


def _tensors(transcoder: SAE[Any]) -> dict[str, torch.Tensor]:
    tensors = {
        "W_enc": transcoder.W_enc.detach().T,
        "W_dec": transcoder.W_dec.detach(),
        "b_enc": transcoder.b_enc.detach(),
        "b_dec": transcoder.b_dec.detach(),
    }
    if isinstance(transcoder, SkipTranscoder):
        tensors["W_skip"] = transcoder.W_skip.detach()
    if isinstance(transcoder, JumpReLUTranscoder):
        tensors["activation_function.threshold"] = transcoder.threshold.detach()
    return {name: tensor.to("cpu", torch.float32).contiguous() for name, tensor in tensors.items()}


def load_circuit_tracer(folder: str | os.PathLike[str], device: str = "cpu") -> list[SAE[Any]]:
    """The SAELens transcoders of a circuit-tracer transcoder-set folder (ours or anyone's)."""
    root = Path(folder).expanduser()
    config = yaml.safe_load((root / CONFIG_FILENAME).read_text())
    if config.get("model_kind") != "transcoder_set":
        raise ValueError(f"{root} holds a {config.get('model_kind')!r}, not a transcoder_set.")
    transcoders = []
    for layer, name in enumerate(config["transcoders"]):
        tensors = load_file(str(root / Path(name).name))
        skip, jump = "W_skip" in tensors, "activation_function.threshold" in tensors
        architecture = {
            (False, False): "transcoder",
            (True, False): "skip_transcoder",
            (False, True): "jumprelu_transcoder",
            (True, True): "jumprelu_skip_transcoder",
        }[(skip, jump)]
        sae_cls, cfg_cls = get_sae_class(architecture)
        d_sae, d_in = tensors["W_enc"].shape
        cfg = cfg_cls.from_dict(
            {
                "architecture": architecture,
                "d_in": d_in,
                "d_sae": d_sae,
                "d_out": tensors["W_dec"].shape[1],
                "dtype": "float32",
                "device": device,
                "apply_b_dec_to_input": False,
                "metadata": {
                    "hook_name": f"blocks.{layer}.{config['feature_input_hook']}",
                    "hook_name_out": f"blocks.{layer}.{config['feature_output_hook']}",
                    "model_name": config.get("model_name"),
                },
            }
        )
        state = {"W_enc": tensors["W_enc"].T, "W_dec": tensors["W_dec"], "b_enc": tensors["b_enc"]}
        state["b_dec"] = tensors["b_dec"]
        if skip:
            state["W_skip"] = tensors["W_skip"]
        if jump:
            state["threshold"] = tensors["activation_function.threshold"]
        transcoder = sae_cls(cfg)
        transcoder.load_state_dict({k: v.contiguous() for k, v in state.items()})
        transcoders.append(transcoder.to(device))
    return transcoders
