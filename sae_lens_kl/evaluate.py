"""Spliced-model evaluation: the numbers an SAE is judged by, computed like `sae_lens.evals`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.util import get_special_token_ids
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.architectures import flat_activations, to_inference_sae
from sae_lens_kl.data import DataError, DataSource, take, token_sequences
from sae_lens_kl.losses import cross_entropy_per_token, kl_per_token
from sae_lens_kl.splice import (
    HookSite,
    VocabProjection,
    run_prefix,
    run_to_output,
    supports_prefix_reuse,
)
from sae_lens_kl.trainer import position_mask


@dataclass
class EvalResult:
    """Metrics over the evaluated positions (special tokens and excluded first positions left out,
    as SAELens's evals leave out special tokens). CE and KL are nats per token."""

    ce_clean: float
    """Cross-entropy of the clean model."""
    ce_spliced: float
    """Cross-entropy with the SAE's reconstruction spliced in."""
    ce_ablated: float
    """Cross-entropy with the hook's activation zeroed (SAELens's zero ablation)."""
    ce_gap: float
    """ce_spliced - ce_clean: what the fine-tune tries to close."""
    ce_score: float
    """(ce_ablated - ce_spliced) / (ce_ablated - ce_clean), SAELens's ce_loss_score."""
    kl: float
    """Mean KL(p_clean || p_spliced)."""
    kl_ablated: float
    """Mean KL(p_clean || p_ablated)."""
    kl_score: float
    """(kl_ablated - kl) / kl_ablated, SAELens's kl_div_score."""
    l0: float
    """Mean active latents per token."""
    mse: float
    """Mean over tokens of the squared reconstruction error summed over dimensions."""
    explained_variance: float
    """1 - E||x - x_hat||^2 / Var(x) (SAELens's ExplainedVarianceCalculator)."""
    dead_latents: int
    """Latents that never fired on these tokens."""
    n_tokens: int
    """Positions evaluated."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def special_token_ids(model: HookedRootModule) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    return [] if tokenizer is None else list(get_special_token_ids(tokenizer))


@torch.no_grad()
def evaluate(
    sae: SAE[Any],
    model: HookedRootModule,
    data: DataSource,
    *,
    n_tokens: int = 65_536,
    batch_size: int = 4,
    context_size: int | None = None,
    prepend_bos: bool | None = None,
    exclude_special_tokens: bool = True,
    exclude_first_positions: int = 0,
    chunk_tokens: int = 256,
    prefix_reuse: bool = True,
) -> EvalResult:
    """Evaluate `sae` spliced into `model` on the first `n_tokens` tokens of `data` (rounded up to
    whole sequences). `data` is any source `kl_finetune` accepts, or a [n_seq, seq] token tensor
    used as it is."""
    metadata = sae.cfg.metadata
    if isinstance(data, torch.Tensor) and data.ndim == 2:
        n_seq = -(-n_tokens // data.shape[1])
        sequences = data[:n_seq].long()
    else:
        ctx = context_size or metadata.context_size or 1024
        bos = prepend_bos if prepend_bos is not None else metadata.prepend_bos is not False
        n_seq = -(-n_tokens // ctx)
        sequences = take(token_sequences(data, model, ctx, bos), n_seq)
        if sequences is None:
            raise DataError(f"The evaluation data holds fewer than {n_seq} sequences of {ctx} tokens.")
    ignored = special_token_ids(model) if exclude_special_tokens else []
    return evaluate_tokens(
        sae,
        model,
        sequences,
        batch_size=batch_size,
        special_token_ids=ignored,
        exclude_first_positions=exclude_first_positions,
        chunk_tokens=chunk_tokens,
        prefix_reuse=prefix_reuse,
    )


@torch.no_grad()
def evaluate_tokens(
    sae: SAE[Any],
    model: HookedRootModule,
    sequences: torch.Tensor,
    *,
    batch_size: int,
    special_token_ids: list[int],
    exclude_first_positions: int,
    chunk_tokens: int,
    prefix_reuse: bool = True,
) -> EvalResult:
    if isinstance(sae, TrainingSAE):
        sae = to_inference_sae(sae)
    site = HookSite.for_model(model, sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index)
    reuse = prefix_reuse and supports_prefix_reuse(model, site)
    projection = VocabProjection.for_run(model, reuse)
    device = next(model.parameters()).device
    ce: dict[str, list[torch.Tensor]] = {"clean": [], "spliced": [], "ablated": []}
    kls: dict[str, list[torch.Tensor]] = {"spliced": [], "ablated": []}
    l0s, sq_errors = [], []
    variance = ExplainedVarianceCalculator()
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)

    for batch in tqdm(sequences.split(batch_size), desc="Evaluating", leave=False):
        tokens = batch.to(device)
        keep = position_mask(tokens, special_token_ids, exclude_first_positions)
        prefix = run_prefix(model, tokens, site) if reuse else None
        clean_out, acts = run_to_output(model, tokens, prefix, site)
        with flat_activations(sae):
            feature_acts = sae.encode(acts.to(sae.device))
            recon = sae.decode(feature_acts).to(acts.device, acts.dtype)
        spliced_acts = torch.where(keep[..., None], recon, acts)
        spliced_out, _ = run_to_output(model, tokens, prefix, site, lambda _, new=spliced_acts: new)
        ablated_out, _ = run_to_output(model, tokens, prefix, site, torch.zeros_like)

        ce_rows = keep[:, :-1].flatten()
        targets = tokens[:, 1:].flatten()
        for name, output in (
            ("clean", clean_out),
            ("spliced", spliced_out),
            ("ablated", ablated_out),
        ):
            per_token = cross_entropy_per_token(
                output[:, :-1].flatten(0, 1), targets, projection, chunk_tokens
            )
            ce[name].append(per_token[ce_rows])
        kept = keep.flatten()
        clean_flat = clean_out.flatten(0, 1)
        for name, output in (("spliced", spliced_out), ("ablated", ablated_out)):
            per_token = kl_per_token(clean_flat, output.flatten(0, 1), projection, chunk_tokens)
            kls[name].append(per_token[kept])

        x = acts[keep].float()
        x_hat = recon[keep].float()
        active = feature_acts[keep.to(feature_acts.device)] != 0
        l0s.append(active.sum(-1).float())
        sq_errors.append((x - x_hat).pow(2).sum(-1))
        variance.add_batch(sae_output=x_hat, hidden_acts=x)
        fired |= active.any(0)

    def mean(parts: list[torch.Tensor]) -> float:
        return torch.cat(parts).float().mean().item()

    ce_clean, ce_spliced, ce_ablated = mean(ce["clean"]), mean(ce["spliced"]), mean(ce["ablated"])
    kl, kl_ablated = mean(kls["spliced"]), mean(kls["ablated"])
    return EvalResult(
        ce_clean=ce_clean,
        ce_spliced=ce_spliced,
        ce_ablated=ce_ablated,
        ce_gap=ce_spliced - ce_clean,
        ce_score=(ce_ablated - ce_spliced) / (ce_ablated - ce_clean),
        kl=kl,
        kl_ablated=kl_ablated,
        kl_score=(kl_ablated - kl) / kl_ablated,
        l0=mean(l0s),
        mse=mean(sq_errors),
        explained_variance=variance.compute(),
        dead_latents=int((~fired).sum().item()),
        n_tokens=int(sum(part.numel() for part in l0s)),
    )
