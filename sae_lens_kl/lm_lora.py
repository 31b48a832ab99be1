"""LoRA on the language model (Chen et al. 2025, "Low-Rank Adapting Models for Sparse
Autoencoders"): the SAE stays frozen and the model's blocks after its hook (or all its blocks)
learn low-rank updates that make the spliced model's predictions match the clean model's.

The base weights are never touched: each update W + B A is added through TransformerLens hook
points, as output += (input @ A.T) @ B.T, where the input is read at the hook that feeds the
weight and the output is the hook after it (query/key/value from ln1's output, W_O from hook_z to
hook_attn_out, the MLP's input weights from ln2's output to hook_pre (and hook_pre_linear for
gated MLPs), W_out from hook_post to hook_mlp_out). The hooks are active only in the spliced pass
of a fine-tune; the clean pass is the unmodified model. The adapter is its own artifact,
`lm_lora.safetensors`; `load_lm_lora(folder, model)` reads it and `applied(model)` /
`attach(model)` put it on a model (e.g. a HookedSAETransformer with the SAE added).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

LM_LORA_FILENAME = "lm_lora.safetensors"
LM_LORA_FORMAT = "sae_lens_kl.lm_lora/1"
Hook = tuple[str, Callable[[torch.Tensor, HookPoint], torch.Tensor | None]]


@dataclass(frozen=True)
class LoRATarget:
    """One adapted weight: read its input at `input_hook`, add the update at `output_hook`."""

    name: str
    input_hook: str
    output_hook: str
    in_features: int
    out_features: int


def lm_lora_targets(model: HookedTransformer, sae_hook: str, layers: str = "after") -> list[LoRATarget]:
    """The linear maps of every block after `sae_hook` (from block L for blocks.L.hook_resid_pre,
    else from block L+1), or of every block (layers='all'), as far as this model has the hook
    points around them."""
    cfg, hooks = model.cfg, model.hook_dict
    if cfg.use_split_qkv_input or cfg.use_attn_in:
        raise ValueError(
            "LoRA on the LM reads attention inputs at ln1; turn off use_split_qkv_input/use_attn_in."
        )
    layer = int(sae_hook.split(".")[1]) if sae_hook.startswith("blocks.") else -1
    first = 0 if layers == "all" else layer if sae_hook.endswith(".hook_resid_pre") else layer + 1
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    attn_width, d_mlp = cfg.n_heads * cfg.d_head, cfg.d_mlp or 0
    targets = []
    for block in range(max(first, 0), cfg.n_layers):
        prefix = f"blocks.{block}"
        attn_in = (
            f"{prefix}.ln1.hook_normalized"
            if f"{prefix}.ln1.hook_normalized" in hooks
            else f"{prefix}.hook_resid_pre"
        )
        mlp_in = (
            f"{prefix}.ln2.hook_normalized"
            if f"{prefix}.ln2.hook_normalized" in hooks
            else f"{prefix}.hook_resid_mid"
        )
        candidates = [
            ("W_Q", attn_in, f"{prefix}.attn.hook_q", cfg.d_model, attn_width),
            ("W_K", attn_in, f"{prefix}.attn.hook_k", cfg.d_model, n_kv * cfg.d_head),
            ("W_V", attn_in, f"{prefix}.attn.hook_v", cfg.d_model, n_kv * cfg.d_head),
            ("W_O", f"{prefix}.attn.hook_z", f"{prefix}.hook_attn_out", attn_width, cfg.d_model),
            ("W_gate" if cfg.gated_mlp else "W_in", mlp_in, f"{prefix}.mlp.hook_pre", cfg.d_model, d_mlp),
            ("W_in", mlp_in, f"{prefix}.mlp.hook_pre_linear", cfg.d_model, d_mlp),
            ("W_out", f"{prefix}.mlp.hook_post", f"{prefix}.hook_mlp_out", d_mlp, cfg.d_model),
        ]
        targets += [
            LoRATarget(f"{prefix}.{weight}", source, sink, n_in, n_out)
            for weight, source, sink, n_in, n_out in candidates
            if source in hooks and sink in hooks and n_in and n_out
        ]
    if not targets:
        raise ValueError(
            f"No block of this model comes after {sae_hook}, so LoRA on the LM after the SAE has "
            "nothing to adapt; use an SAE at an earlier hook."
        )
    return targets


class LMLoRA(nn.Module):
    """Low-rank updates B A (A [rank, in], B [out, rank]) of the target weights. B starts at zero,
    so the adapted model equals the base model before training; A as in LoRA (Kaiming-uniform),
    from a fixed seed (`seed`) so that runs repeat."""

    filename = LM_LORA_FILENAME

    def __init__(self, targets: list[LoRATarget], rank: int, *, model_name: str = "", seed: int = 0) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lm_lora_rank={rank!r} must be a positive integer.")
        self.targets, self.rank, self.model_name = list(targets), rank, model_name
        generator = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for target in self.targets:
            bound = 1 / math.sqrt(target.in_features)
            a = (
                torch.rand(rank, target.in_features, generator=generator, dtype=torch.float64) * 2 * bound
                - bound
            )
            self.A.append(nn.Parameter(a.float()))
            self.B.append(nn.Parameter(torch.zeros(target.out_features, rank)))

    def hooks(self) -> list[Hook]:
        """TransformerLens forward hooks that apply the updates: each input hook keeps its tensor,
        each output hook adds (input @ A.T) @ B.T. The hooks of one forward pass share the kept
        inputs, so use them for whole passes (TransformerLens runs input hooks before outputs)."""
        inputs: dict[str, torch.Tensor] = {}

        def keep(tensor: torch.Tensor, hook: HookPoint) -> None:
            assert hook.name is not None
            inputs[hook.name] = tensor

        def add(tensor: torch.Tensor, hook: HookPoint, index: int) -> torch.Tensor:  # noqa: ARG001
            target = self.targets[index]
            x = inputs[target.input_hook]
            x = x.flatten(-2) if x.ndim == 4 else x  # hook_z: [batch, pos, head, d_head]
            update = (x @ self.A[index].T.to(x.dtype)) @ self.B[index].T.to(x.dtype)
            return tensor + update.view(tensor.shape)

        sources = dict.fromkeys(target.input_hook for target in self.targets)
        return [(name, keep) for name in sources] + [
            (target.output_hook, _bind(add, index=index)) for index, target in enumerate(self.targets)
        ]

    @contextmanager
    def applied(self, model: HookedTransformer) -> Iterator[None]:
        """The model adapted inside the block (hooks removed afterwards)."""
        with model.hooks(fwd_hooks=self.hooks()):
            yield

    def attach(self, model: HookedTransformer) -> None:
        """Adapt the model until its permanent hooks are reset (reset_hooks(including_permanent=True))."""
        for name, hook in self.hooks():
            model.add_perma_hook(name, hook)

    def save(self, path: Path) -> None:
        tensors = {}
        for target, a, b in zip(self.targets, self.A, self.B, strict=True):
            tensors[f"{target.name}.A"] = a.detach().contiguous().cpu()
            tensors[f"{target.name}.B"] = b.detach().contiguous().cpu()
        metadata = {
            "format": LM_LORA_FORMAT,
            "rank": str(self.rank),
            "model_name": self.model_name,
            "targets": json.dumps([asdict(target) for target in self.targets]),
        }
        save_file(tensors, path, metadata=metadata)


def load_lm_lora(path: str | os.PathLike[str], model: HookedTransformer) -> LMLoRA:
    """Read the LoRA a fine-tune saved (its save_dir or the lm_lora.safetensors in it) for `model`,
    the base model it was trained on; apply it with `applied(model)` or `attach(model)`."""
    file = Path(path) / LM_LORA_FILENAME if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"No LM LoRA at {file}: pass the save_dir of a fine-tune with lm_lora_rank=..."
        )
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
    if metadata.get("format") != LM_LORA_FORMAT:
        raise ValueError(f"{file} is not an sae_lens_kl LM LoRA (format {metadata.get('format')!r}).")
    targets = [LoRATarget(**fields) for fields in json.loads(metadata["targets"])]
    hooks = model.hook_dict
    missing = [t.output_hook for t in targets if t.input_hook not in hooks or t.output_hook not in hooks]
    if missing or metadata["model_name"] != model.cfg.model_name:
        gaps = f"; missing hooks {missing[:3]}" if missing else ""
        raise ValueError(
            f"The LM LoRA at {file} was trained on {metadata['model_name']!r}, not this model "
            f"({model.cfg.model_name!r}{gaps}): pass its base model."
        )
    lora = LMLoRA(targets, int(metadata["rank"]), model_name=metadata["model_name"])
    lora.load_state_dict(
        {f"A.{i}": tensors[f"{t.name}.A"] for i, t in enumerate(targets)}
        | {f"B.{i}": tensors[f"{t.name}.B"] for i, t in enumerate(targets)}
    )
    device = next(model.parameters()).device
    return lora.to(device)


def _bind(function: Callable[..., torch.Tensor], **bound: int) -> Callable[..., torch.Tensor]:
    def hook(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return function(tensor, hook, **bound)

    return hook
