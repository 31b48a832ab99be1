"""Splicing an activation into a TransformerLens forward pass through its hook points.

One mechanism: a hook at the SAE's hook point either records the clean activation or replaces it.
For a `HookedTransformer` the blocks before the hook's block run once (`run_prefix`) and both the
clean and the spliced suffix continue from there with `start_at_layer`; other models (e.g.
TransformerBridge) run full hooked forwards.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens import SAE
from torch.utils.checkpoint import checkpoint
from transformer_lens import HookedTransformer
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


def kl_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of every vocabulary-sized computation: float32, or float64 for a float64 model
    (used to compare two computations of the same quantity at float64 rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


CPU_VOCAB_BLOCK = 2048
"""Vocabulary columns per unembedding product on CPU. Each [tokens, block] piece of the logits is
written while it is in cache; one product over the whole vocabulary writes [tokens, vocab] through
memory and ran ~20 % slower (GPT-2's 50257 x 768, 512 tokens, 2 threads, torch 2.13: 222 ms whole,
175 ms in blocks of 2048 with MKL; 128 ms whole, 103 ms in blocks with oneDNN; 2048-8192 within 5 %)."""


def onednn_linear_available(weight: torch.Tensor) -> bool:
    """Whether float32 CPU products with `weight` go through oneDNN (`onednn_linear`).

    torch 2.13's CPU build runs float32 matmuls through MKL 2024.2, which on this project's AMD
    EPYC (Zen 5) machines reaches ~180 GFLOP/s at 2 threads; oneDNN, which dispatches on the CPU's
    instruction set (AVX-512 here), ~400 (2048^3), and 2.1x on the unembedding products
    (512 x 768 x 50257: 211 -> 103 ms; its transpose 204 -> 94 ms). `torch.backends.mkldnn.enabled
    = False` switches it off."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """inputs @ weight.T + bias, as F.linear, through oneDNN's linear: torch's own op for inductor's
    CPU linears (`mkldnn::_linear_pointwise`, used as of torch 2.13; a build without it takes MKL,
    see onednn_linear_available), with no fused activation. `weight` [out, in] must be contiguous:
    a strided one fell to a kernel 100x slower (torch 2.13). The op has no autograd kernel (its
    backward would silently give no gradient), so under autograd this is F.linear."""
    tensors = (inputs, weight) if bias is None else (inputs, weight, bias)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return F.linear(inputs, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), weight, bias, "none", [], "")


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
            # TransformerLens marks "no softcap" as -1.0 (or None)
            max(float(model.cfg.output_logits_soft_cap or 0.0), 0.0),
        )

    @property
    def supports_statistics(self) -> bool:
        """Whether CleanStatistics describe the clean distribution exactly: a float32 (or float64)
        linear unembedding (in lower precision W_U q - W_U p would cancel away the signal)."""
        return self.W_U is not None and self.softcap == 0 and self.W_U.dtype in (torch.float32, torch.float64)

    def vocab_size(self, output: torch.Tensor) -> int:
        """Width of the logits of run outputs like `output` [..., d]."""
        return output.shape[-1] if self.W_U is None else self.W_U.shape[1]

    def logits(self, output: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a chunk of run outputs [n, d], in float32 (float64 for a float64 model),
        written into `out` [n, vocab] (a new tensor if None; reuse one for every chunk: on CPU a
        fresh tensor this size is page-faulted in again each time, ~13 ms per 50 MB)."""
        dtype = kl_dtype(output.dtype)
        if out is None:
            out = output.new_empty((output.shape[0], self.vocab_size(output)), dtype=dtype)
        if self.W_U is None:
            out.copy_(output)
        elif output.dtype == self.W_U.dtype == dtype:
            assert self.b_U is not None
            vocab = self.W_U.shape[1]
            block = CPU_VOCAB_BLOCK if output.device.type == "cpu" else vocab
            for start in range(0, vocab, block):
                columns = slice(start, start + block)
                if self._vocab_rows is not None:
                    out[:, columns] = onednn_linear(output, self._vocab_rows[columns], self.b_U[columns])
                else:
                    torch.addmm(self.b_U[columns], output, self.W_U[:, columns], out=out[:, columns])
        else:
            out.copy_(torch.addmm(self.b_U, output, self.W_U))
        if self.softcap > 0:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def softcap_backward_(self, grad_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. the logits before the softcap, in place of `grad_logits` (the
        gradient w.r.t. `logits`, the capped logits)."""
        if self.softcap > 0:
            grad_logits.mul_(1 - (logits / self.softcap) ** 2)
        return grad_logits

    def output_gradient(self, grad_logits: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Gradient w.r.t. the run outputs [n, d] given the gradient w.r.t. their logits before the
        softcap [n, vocab]."""
        if self.W_U is None:
            return grad_logits.to(out_dtype)
        return self.unembed_transposed(grad_logits.to(self.W_U.dtype))

    def unembed_transposed(self, by_vocab: torch.Tensor) -> torch.Tensor:
        """by_vocab [n, vocab] @ W_U^T: [n, d_model] (gradients, and W_U p of a distribution p)."""
        assert self.W_U is not None
        if self._vocab_rows is not None:  # W_U is [d_model, vocab]: F.linear's [out, in]
            return onednn_linear(by_vocab, self._unembed_contiguous, None)
        return by_vocab @ self.W_U.T

    @functools.cached_property
    def _vocab_rows(self) -> torch.Tensor | None:
        """W_U^T [vocab, d_model], contiguous, when the products go through oneDNN (made once per
        projection: the size of W_U)."""
        if self.W_U is None or not onednn_linear_available(self.W_U):
            return None
        return self.W_U.T.contiguous()

    @functools.cached_property
    def _unembed_contiguous(self) -> torch.Tensor:
        assert self.W_U is not None
        return self.W_U.contiguous()


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
