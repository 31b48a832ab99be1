"""Splicing an activation into a TransformerLens forward pass through its hook points.

One mechanism: a hook at the SAE's hook point either records the clean activation or replaces it.
For a `HookedTransformer` the blocks before the hook's block run once (`run_prefix`) and both the
clean and the spliced suffix continue from there with `start_at_layer`; other models (e.g.
TransformerBridge) run full hooked forwards.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from sae_lens import SAE
from torch.utils.checkpoint import checkpoint
from transformer_lens import HookedTransformer
from transformer_lens.components import AbstractAttention, GatedMLP
from transformer_lens.hook_points import HookedRootModule, HookPoint

from sae_lens_kl.transcoders import is_transcoder

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


class CompiledBlocks:
    """torch.compile'd wrappers of a HookedTransformer's blocks, for the fine-tune's hot loop.

    TransformerLens runs each block as dozens of small eager ops (LayerNorm in Python, attention
    with an explicit masked pattern, unfused gelu_new); inductor fuses the elementwise ones. A block
    with any hook registered on one of its hook points runs eagerly instead, so every hook (the
    splice's, a user's) fires as in TransformerLens. The model is not modified: torch.compile wraps
    each block and shares its parameters. Shapes are static: a new batch shape or grad mode compiles
    once more.
    """

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model
        self.compiled = [torch.compile(block, dynamic=False) for block in model.blocks]
        self.hook_points = [
            [module for module in block.modules() if isinstance(module, HookPoint)] for block in model.blocks
        ]

    def run(self, residual: torch.Tensor, start: int, stop: int, prefix: Prefix) -> torch.Tensor:
        """Blocks [start, stop) from `residual`, as HookedTransformer.forward runs them."""
        for index in range(start, stop):
            hooked = any(point._forward_hooks or point._backward_hooks for point in self.hook_points[index])
            block = self.model.blocks[index] if hooked else self.compiled[index]
            residual = block(
                residual,
                shortformer_pos_embed=prefix.shortformer_pos_embed,
                attention_mask=prefix.attention_mask,
            )
        return residual


@dataclass
class Prefix:
    """State of the forward pass entering the SAE's block, computed once per batch; `blocks` runs
    the blocks from there (None: HookedTransformer.forward with start_at_layer)."""

    residual: torch.Tensor
    tokens: torch.Tensor
    shortformer_pos_embed: torch.Tensor | None
    attention_mask: torch.Tensor | None
    start_layer: int
    blocks: CompiledBlocks | None = None
    checkpoint_from: int | None = None
    """Under autograd, run each block from this one on through torch.utils.checkpoint: its
    activations are recomputed in backward instead of kept (gradient checkpointing of the spliced
    suffix). The recomputation runs after the forward's hooks are removed, so only blocks whose
    hooks do not change the activations (none, or recordings) may be checkpointed."""

    def run_blocks(self, model: HookedTransformer, stop: int) -> torch.Tensor:
        """The residual after blocks [start_layer, stop)."""
        if self.checkpoint_from is not None and torch.is_grad_enabled():
            kept = replace(self, checkpoint_from=None)
            residual = kept.run_blocks(model, min(stop, self.checkpoint_from))
            for index in range(max(self.start_layer, self.checkpoint_from), stop):
                one = replace(kept, residual=residual, start_layer=index)
                residual = checkpoint(one.run_blocks, model, index + 1, use_reentrant=False)
            return residual
        if self.blocks is not None:
            return self.blocks.run(self.residual, self.start_layer, stop, self)
        return model(
            self.residual,
            start_at_layer=self.start_layer,
            stop_at_layer=stop,
            shortformer_pos_embed=self.shortformer_pos_embed,
            attention_mask=self.attention_mask,
        )


@torch.no_grad()
def cached_prefix(
    model: HookedTransformer,
    tokens: torch.Tensor,
    residual: torch.Tensor,
    site: HookSite,
    blocks: CompiledBlocks | None = None,
) -> Prefix:
    """The Prefix of a cached clean pass: the stored residual, with the attention mask and
    positional inputs that `input_to_embed` derives from the tokens (an embedding lookup)."""
    assert site.block is not None
    _, tokens, shortformer_pos_embed, attention_mask = model.input_to_embed(tokens)
    return Prefix(residual, tokens, shortformer_pos_embed, attention_mask, site.block, blocks)


def sae_sites(model: HookedRootModule, sae: SAE[Any]) -> tuple[HookSite, HookSite]:
    """(where the SAE reads its input, where its output replaces the activation): one site for an
    SAE; for a transcoder its output hook `metadata.hook_name_out`, which must come after its input
    hook in the forward pass."""
    metadata = sae.cfg.metadata
    site = HookSite.for_model(model, metadata.hook_name, metadata.hook_head_index)
    if not is_transcoder(sae):
        return site, site
    if not metadata.hook_name_out:
        raise ValueError(
            "The transcoder's metadata has no hook_name_out; set sae.cfg.metadata.hook_name_out to the "
            "hook point its output replaces (e.g. 'blocks.0.hook_mlp_out')."
        )
    out = HookSite.for_model(model, metadata.hook_name_out, None)
    if out.hook_name not in hooks_after(model, site.hook_name):
        raise ValueError(
            f"The transcoder's output hook {out.hook_name!r} does not come after its input hook "
            f"{site.hook_name!r} in the forward pass; a transcoder maps an activation to a later one."
        )
    return site, out


def hooks_after(model: HookedRootModule, hook_name: str) -> list[str]:
    """Every hook point after `hook_name` in the forward pass (TransformerLens registers hook
    points in forward order)."""
    order = list(model.hook_dict)
    return order[order.index(hook_name) + 1 :]


def later_residual_hooks(model: HookedRootModule, hook_name: str) -> list[str]:
    """Every hook_resid_post after `hook_name` in the forward pass."""
    return [name for name in hooks_after(model, hook_name) if name.endswith("hook_resid_post")]


def supports_prefix_reuse(model: HookedRootModule, site: HookSite) -> bool:
    return isinstance(model, HookedTransformer) and site.block is not None


@torch.no_grad()
def run_prefix(
    model: HookedTransformer, tokens: torch.Tensor, site: HookSite, blocks: CompiledBlocks | None = None
) -> Prefix:
    """Embed and run the blocks before `site.block`, keeping what the suffix needs."""
    return embedded_prefix(model, tokens, site, blocks)


def embedded_prefix(
    model: HookedTransformer, tokens: torch.Tensor, site: HookSite, blocks: CompiledBlocks | None = None
) -> Prefix:
    """`run_prefix` under the caller's grad mode: the spliced pass of LoRA on every block, whose
    updates before the SAE's block train through it."""
    assert site.block is not None
    residual, tokens, shortformer_pos_embed, attention_mask = model.input_to_embed(tokens)
    embedded = Prefix(residual, tokens, shortformer_pos_embed, attention_mask, 0, blocks)
    if site.block > 0:
        residual = embedded.run_blocks(model, site.block)
    return replace(embedded, residual=residual, start_layer=site.block)


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
            residual = prefix.run_blocks(model, model.cfg.n_layers)
            if model.cfg.normalization_type is not None:
                residual = model.ln_final(residual)
            output = model.unembed.hook_in(residual)
    return output, seen["acts"]


def run_to_hook(
    model: HookedRootModule,
    tokens: torch.Tensor,
    prefix: Prefix | None,
    site: HookSite,
    last_block: int | None = None,
) -> torch.Tensor:
    """The SAE input at the hook [batch, pos, d_in], running no further than the hook's block (or
    `last_block`, where a transcoder's output hook lies)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(raw: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
        seen["acts"] = site.read(raw)
        return raw

    with model.hooks(fwd_hooks=[(site.hook_name, keep)]):
        if prefix is None:
            model(tokens)
        else:
            assert isinstance(model, HookedTransformer) and site.block is not None
            prefix.run_blocks(model, max(site.block, last_block or 0) + 1)
    return seen["acts"]


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


@contextmanager
def frozen(model: HookedRootModule) -> Iterator[None]:
    """No gradients for the LM's weights while the SAE trains; flags restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _read_orders(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The weights of `module` that TransformerLens 3.9.0 copies into another layout at every
    forward before its F.linear, each with the order in which that copy reads its dimensions:
    GatedMLP's `W.T.contiguous()`, attention's W_Q/K/V rearranged to [(head d_head), d_model] and
    W_O to [d_model, (head d_head)] (simple_attn_linear; only on the F.linear paths: not with
    split q/k/v inputs, attn_in or per-head results). Not the unembedding (Unembed copies W_U too,
    but this package's runs stop before it and form logits with `VocabProjection`, whose products
    keep W_U's own layout)."""
    cfg = getattr(module, "cfg", None)
    if cfg is None or getattr(cfg, "load_in_4bit", False):
        return {}
    if isinstance(module, GatedMLP):
        return {"W_gate": (1, 0), "W_in": (1, 0), "W_out": (1, 0)}
    if isinstance(module, AbstractAttention):
        orders: dict[str, tuple[int, ...]] = {}
        if not (cfg.use_split_qkv_input or cfg.use_attn_in):
            orders |= {name: (0, 2, 1) for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V")}
        if not cfg.use_attn_result:
            orders["W_O"] = (2, 0, 1)
        return orders
    return {}


@contextmanager
def linear_layout(model: HookedRootModule) -> Iterator[None]:
    """While in the block, the LM's weights that TransformerLens 3.9.0 re-lays out at every forward
    (`_read_orders`) are stored in the layout it makes, so that its copy is a no-op view: at the
    demo's 2 x 128-token KL step those copies were ~15 % of the step in a profile; the clean
    forward and the spliced suffix run 22 % and 12 % faster (benchmarks/linear_layout.py). The
    same values reach the same F.linear in the same layout, so every forward is bit-identical; on
    exit each weight gets its usual contiguous layout back (values never change). Nested uses
    leave the outer one's layout alone."""
    relaid: list[torch.nn.Parameter] = []
    try:  # a failure while laying out (out of memory) restores what was laid out already
        for module in model.modules():
            for name, order in _read_orders(module).items():
                parameter = module._parameters.get(name)
                if parameter is None or not parameter.is_floating_point():
                    continue
                if parameter.permute(order).is_contiguous():  # already laid out (a nested use)
                    continue
                back = tuple(sorted(range(len(order)), key=order.__getitem__))
                parameter.data = parameter.data.permute(order).contiguous().permute(back)
                relaid.append(parameter)
        yield
    finally:
        for parameter in relaid:
            parameter.data = parameter.data.contiguous()
