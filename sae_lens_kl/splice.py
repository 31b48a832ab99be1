"""Splicing an activation into a TransformerLens forward pass through its hook points.

One mechanism: a hook at the SAE's hook point either records the clean activation or replaces it.
For a `HookedTransformer` the blocks before the hook's block run once (`run_prefix`) and both the
clean and the spliced suffix continue from there with `start_at_layer`; other models (e.g.
TransformerBridge) run full hooked forwards.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule, HookPoint

_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_HEAD_DIM_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")


@dataclass(frozen=True)
class HookSite:
    """Where an SAE reads and writes: a hook point, an optional head, and the block that holds it."""

    hook_name: str
    head_index: int | None
    block: int | None

    @classmethod
    def for_model(cls, model: HookedRootModule, hook_name: str, head_index: int | None) -> HookSite:
        if hook_name not in model.hook_dict:
            close = difflib.get_close_matches(hook_name, list(model.hook_dict), n=5)
            raise ValueError(
                f"Hook point {hook_name!r} does not exist in this model. Closest hook points: "
                f"{close}. Pass an SAE trained on this model, or the model it was trained on."
            )
        match = _BLOCK_INDEX.match(hook_name)
        return cls(hook_name, head_index, int(match.group(1)) if match else None)

    @property
    def has_head_dim(self) -> bool:
        return any(self.hook_name.endswith(suffix) for suffix in _HEAD_DIM_HOOKS)

    def read(self, raw: torch.Tensor) -> torch.Tensor:
        """The SAE's input, [batch, pos, d_in], from the hook's tensor (heads flattened)."""
        if self.head_index is not None:
            return raw[:, :, self.head_index]
        if self.has_head_dim:
            return raw.flatten(-2, -1)
        return raw

    def write(self, raw: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """The hook's tensor with the SAE's part replaced by `acts` [batch, pos, d_in]."""
        acts = acts.to(raw.dtype)
        if self.head_index is not None:
            out = raw.clone()
            out[:, :, self.head_index] = acts
            return out
        return acts.reshape(raw.shape)


@dataclass
class Prefix:
    """State of the forward pass entering the SAE's block, computed once per batch."""

    residual: torch.Tensor
    tokens: torch.Tensor
    shortformer_pos_embed: torch.Tensor | None
    attention_mask: torch.Tensor | None
    start_layer: int


@torch.no_grad()
def cached_prefix(
    model: HookedTransformer, tokens: torch.Tensor, residual: torch.Tensor, site: HookSite
) -> Prefix:
    """The Prefix of a cached clean pass: the stored residual, with the attention mask and
    positional inputs that `input_to_embed` derives from the tokens (an embedding lookup)."""
    assert site.block is not None
    _, tokens, shortformer_pos_embed, attention_mask = model.input_to_embed(tokens)
    return Prefix(residual, tokens, shortformer_pos_embed, attention_mask, site.block)


def supports_prefix_reuse(model: HookedRootModule, site: HookSite) -> bool:
    return isinstance(model, HookedTransformer) and site.block is not None


@torch.no_grad()
def run_prefix(model: HookedTransformer, tokens: torch.Tensor, site: HookSite) -> Prefix:
    """Embed and run the blocks before `site.block`, keeping what the suffix needs."""
    assert site.block is not None
    residual, tokens, shortformer_pos_embed, attention_mask = model.input_to_embed(tokens)
    if site.block > 0:
        residual = model(
            residual,
            start_at_layer=0,
            stop_at_layer=site.block,
            shortformer_pos_embed=shortformer_pos_embed,
            attention_mask=attention_mask,
        )
    return Prefix(residual, tokens, shortformer_pos_embed, attention_mask, site.block)


def run_to_output(
    model: HookedRootModule,
    tokens: torch.Tensor,
    prefix: Prefix | None,
    site: HookSite,
    replacement: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the model with the SAE's hook point recording (replacement None) or spliced.

    `replacement` maps the SAE's clean input [batch, pos, d_in] to what flows on instead. With a
    `Prefix` the run continues from the SAE's block and stops at the unembedding input (after the
    final norm), so the vocabulary projection can be chunked; without one it is a full hooked
    forward returning logits. `VocabProjection.for_run` says which. Returns (that output
    [batch, pos, d], SAE input at the hook [batch, pos, d_in]).
    """
    seen: dict[str, torch.Tensor] = {}

    def splice_hook(raw: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
        acts = site.read(raw)
        seen["acts"] = acts
        if replacement is None:
            return raw
        return site.write(raw, replacement(acts))

    with model.hooks(fwd_hooks=[(site.hook_name, splice_hook)]):
        if prefix is None:
            output = model(tokens)
        else:
            assert isinstance(model, HookedTransformer)
            residual = model(
                prefix.residual,
                start_at_layer=prefix.start_layer,
                stop_at_layer=model.cfg.n_layers,
                shortformer_pos_embed=prefix.shortformer_pos_embed,
                attention_mask=prefix.attention_mask,
            )
            if model.cfg.normalization_type is not None:
                residual = model.ln_final(residual)
            output = model.unembed.hook_in(residual)
    return output, seen["acts"]


def run_to_hook(
    model: HookedRootModule, tokens: torch.Tensor, prefix: Prefix | None, site: HookSite
) -> torch.Tensor:
    """The SAE input at the hook [batch, pos, d_in], running no further than the hook's block."""
    seen: dict[str, torch.Tensor] = {}

    def keep(raw: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
        seen["acts"] = site.read(raw)
        return raw

    with model.hooks(fwd_hooks=[(site.hook_name, keep)]):
        if prefix is None:
            model(tokens)
        else:
            assert isinstance(model, HookedTransformer) and site.block is not None
            model(
                prefix.residual,
                start_at_layer=prefix.start_layer,
                stop_at_layer=site.block + 1,
                shortformer_pos_embed=prefix.shortformer_pos_embed,
                attention_mask=prefix.attention_mask,
            )
    return seen["acts"]


@dataclass(frozen=True)
class VocabProjection:
    """Maps a run's output to logits: the model's unembedding (+ softcap), or nothing for logits."""

    W_U: torch.Tensor | None
    b_U: torch.Tensor | None
    softcap: float

    @classmethod
    def for_run(cls, model: HookedRootModule, prefix_reuse: bool) -> VocabProjection:
        if not prefix_reuse:
            return cls(None, None, 0.0)
        assert isinstance(model, HookedTransformer)
        # Use the parameters directly: TransformerLens's Unembed makes a contiguous copy of W_U on
        # every call (transformer-lens 3.9), which the chunked projection would repeat per chunk.
        return cls(
            model.unembed.W_U.detach(),
            model.unembed.b_U.detach(),
            float(model.cfg.output_logits_soft_cap or 0.0),
        )

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """float32 logits of a chunk of run outputs [n, d]."""
        if self.W_U is None:
            return output.float()
        logits = torch.addmm(self.b_U, output, self.W_U).float()
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def backward(
        self, grad_logits: torch.Tensor, logits: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Gradient w.r.t. the run output given the gradient w.r.t. this chunk's logits."""
        if self.softcap > 0:
            grad_logits = grad_logits * (1 - (logits / self.softcap) ** 2)
        if self.W_U is None:
            return grad_logits.to(out_dtype)
        return grad_logits.to(self.W_U.dtype) @ self.W_U.T


def hook_width(model: HookedRootModule, site: HookSite) -> int:
    """Width of the SAE input at `site`, measured with a two-token forward pass."""
    device = next(model.parameters()).device
    probe = torch.zeros((1, 2), dtype=torch.long, device=device)
    widths: list[int] = []

    def measure(raw: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
        widths.append(site.read(raw).shape[-1])
        return raw

    kwargs: dict[str, Any] = {"return_type": None} if isinstance(model, HookedTransformer) else {}
    with torch.no_grad():
        model.run_with_hooks(probe, fwd_hooks=[(site.hook_name, measure)], **kwargs)
    return widths[0]
