"""Adapters after the SAE (Karvonen 2025, App. C): a small trainable map with a skip connection,
applied to the SAE's reconstruction, trained with the SAE frozen.

An adapter attaches to the SAE's own `hook_sae_recons` hook point (every SAELens SAE passes its
reconstruction through it in `decode`) as a permanent TransformerLens hook, so it acts wherever
the SAE runs: in the fine-tune's step (where SAELens's MSE then measures the adapted output), in
`evaluate`, in `HookedSAETransformer` and in `sae(x)`. It is saved beside the SAE as
`adapter.safetensors`; `load_adapter(folder, sae)` attaches it again.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_kl.config import ADAPTER_KINDS, AdapterKind

ADAPTER_FILENAME = "adapter.safetensors"
ADAPTER_FORMAT = "sae_lens_kl.adapter/1"


class Adapter(nn.Module):
    """y = x + f(x) on the SAE's reconstruction x [..., d_in]:
    'linear': f(x) = U V x, V [width, d_in] the down projection, U [d_in, width] the up
    projection, zero-initialised (rank `width`);
    'mlp': f(x) = W2 relu(W1 x + b1) + b2, W2 and b2 zero-initialised (hidden width `width`).
    Both as the paper's released code (its text says V is the zero one; its code zeroes the up
    projection, which we follow). The zero part makes f = 0 at the start, so the adapted SAE
    equals the SAE before training; the other part is initialised as torch's nn.Linear is, from a
    fixed seed (`seed`) so that runs repeat."""

    filename = ADAPTER_FILENAME

    def __init__(
        self,
        kind: AdapterKind,
        d_in: int,
        width: int,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter={kind!r} is not an adapter; choose from {', '.join(ADAPTER_KINDS)}.")
        if not isinstance(width, int) or width <= 0:
            raise ValueError(f"adapter_width={width!r} must be a positive integer.")
        self.kind, self.d_in, self.width = kind, d_in, width
        generator = torch.Generator().manual_seed(seed)

        def uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
            bound = 1 / math.sqrt(fan_in)
            values = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * bound - bound
            return nn.Parameter(values.to(dtype))

        def zeros(shape: tuple[int, ...]) -> nn.Parameter:
            return nn.Parameter(torch.zeros(shape, dtype=dtype))

        if kind == "linear":
            self.V, self.U = uniform((width, d_in), d_in), zeros((d_in, width))
        else:
            self.W1, self.b1 = uniform((width, d_in), d_in), uniform((width,), d_in)
            self.W2, self.b2 = zeros((d_in, width)), zeros((d_in,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return x + (x @ self.V.T) @ self.U.T
        return x + torch.relu(x @ self.W1.T + self.b1) @ self.W2.T + self.b2

    def _on_reconstruction(self, reconstruction: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG002
        return self(reconstruction)

    def attach(self, sae: SAE[Any]) -> Adapter:
        """Apply this adapter to `sae`'s reconstruction from now on (a permanent hook, which
        `reset_hooks()` keeps); returns self."""
        if attached(sae) is not None:
            raise ValueError("This SAE already has an adapter attached; detach it first.")
        sae.hook_sae_recons.add_hook(self._on_reconstruction, is_permanent=True)
        return self

    def detach(self, sae: SAE[Any]) -> None:
        """Stop applying this adapter to `sae`."""
        hook_point = sae.hook_sae_recons
        for handle in [h for h in hook_point.fwd_hooks if h.user_hook == self._on_reconstruction]:
            handle.hook.remove()
            hook_point.fwd_hooks.remove(handle)

    def save(self, path: Path) -> None:
        """Write the adapter's tensors and kind/width/d_in (safetensors metadata) to `path`."""
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        metadata = {"format": ADAPTER_FORMAT, "kind": self.kind}
        metadata |= {"width": str(self.width), "d_in": str(self.d_in)}
        save_file(tensors, path, metadata=metadata)


def attached(sae: SAE[Any]) -> Adapter | None:
    """The adapter attached to `sae`, if any."""
    for handle in sae.hook_sae_recons.fwd_hooks:
        owner = getattr(handle.user_hook, "__self__", None)
        if isinstance(owner, Adapter):
            return owner
    return None


def load_adapter(path: str | os.PathLike[str], sae: SAE[Any]) -> Adapter:
    """Read an adapter saved by a fine-tune (its save_dir or the adapter.safetensors file in it),
    attach it to `sae` (the SAE it was trained after) and return it."""
    file = Path(path) / ADAPTER_FILENAME if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"No adapter at {file}: pass the save_dir of a fine-tune with adapter=...")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{file} is not an sae_lens_kl adapter (format {metadata.get('format')!r}).")
    d_in = int(metadata["d_in"])
    if d_in != sae.cfg.d_in:
        raise ValueError(
            f"The adapter at {file} maps {d_in}-dimensional reconstructions; this SAE's are "
            f"{sae.cfg.d_in}: pass the SAE the adapter was trained after."
        )
    adapter = Adapter(metadata["kind"], d_in, int(metadata["width"]))  # type: ignore[arg-type]
    adapter.load_state_dict(tensors)
    return adapter.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype).attach(sae)
