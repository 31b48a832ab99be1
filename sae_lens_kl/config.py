"""The one configuration object of a KL fine-tune. Every keyword of `kl_finetune` maps onto a field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from sae_lens_kl.typed import check_field_types

# Each set of choices is written once, as a type; the CLI's choices and the checks below derive
# from it (this module imports nothing heavy, so `--help` stays fast).
LossMode = Literal["kl+mse", "kl", "mse", "kl+mse-fixed", "e2e", "e2e+ds"]
LOSS_MODES: tuple[str, ...] = get_args(LossMode)
LRSchedule = Literal["linear", "constant"]
AdapterKind = Literal["linear", "mlp"]
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)
LMLoRALayers = Literal["after", "all"]
LM_LORA_LAYERS: tuple[str, ...] = get_args(LMLoRALayers)
ControllerMode = Literal["auto", "on", "off"]
CONTROLLER_MODES: tuple[str, ...] = get_args(ControllerMode)
# SAELens training architectures this package fine-tunes (tested against SAELens's registry).
TrainingArchitecture = Literal[
    "standard", "gated", "topk", "abstopk", "jumprelu", "batchtopk", "matryoshka_batchtopk"
]
TRAINING_ARCHITECTURES: tuple[str, ...] = get_args(TrainingArchitecture)
# The paper's comparisons (experiments.EXPERIMENTS) and the circuits module's attribution methods.
ReplacementMode = Literal["independent", "joint"]
REPLACEMENT_MODES: tuple[str, ...] = get_args(ReplacementMode)
ExperimentName = Literal["A", "B", "C", "D", "E", "F"]
AttributionMethod = Literal["atp", "ig"]
ATTRIBUTION_METHODS: tuple[str, ...] = get_args(AttributionMethod)

# Defaults that other modules share with the config (the evaluator, the clean-pass cache, the demo).
KL_CHUNK_TOKENS = 256
"""Tokens per chunk of the vocabulary projection (memory: chunk x vocab floats)."""
FALLBACK_CONTEXT_SIZE = 1024
"""Tokens per sequence when neither an option nor the SAE's metadata gives one."""
EVAL_TOKENS = 65_536
"""Held-out tokens evaluated by default."""


@dataclass
class KLFinetuneConfig:
    """Options of a KL+MSE fine-tune (Karvonen 2025, "A Short Finetune Is All You Need")."""

    tokens: int
    """Training token budget (tokens, not sequences). The paper uses the last ~25M tokens."""

    loss: LossMode = "kl+mse"
    """'kl+mse': 0.5*(mse + alpha*kl) with alpha = (mse/(kl+1e-8)).detach() every batch (paper §3.2);
    'kl': KL only; 'mse': MSE-only continuation on the same tokens (the control);
    'kl+mse-fixed': mse + kl_coefficient*kl (a fixed weight instead of the balancing alpha);
    'e2e': kl_coefficient*kl, no MSE at the SAE's hook (Braun et al. 2024's e2e SAE);
    'e2e+ds': kl_coefficient*kl + downstream_coefficient * (mean over downstream_hooks of the MSE,
    per element, between clean and spliced activations there) (Braun et al.'s e2e+ds). The
    architecture's own sparsity/auxiliary losses (SAELens's) are added unchanged in every mode."""

    kl_coefficient: float = 1.0
    """Weight of the KL term in 'kl+mse-fixed', 'e2e' and 'e2e+ds' (Braun et al. used 0.5 for
    e2e+ds on GPT-2); ignored by the other modes."""

    downstream_hooks: list[str] | None = None
    """'e2e+ds': hook points after the SAE's where clean and spliced activations are compared;
    default: hook_resid_post of every block from the SAE's on (after its hook)."""

    downstream_coefficient: float = 2.5
    """'e2e+ds': total weight of the downstream MSE, split evenly over downstream_hooks (Braun et
    al.'s in_to_orig total_coeff)."""

    method: str = "auto"
    """What trains: a name in `methods.METHODS` ('sae', 'sae_lora', 'adapter', 'lm_lora', or one
    registered there), or 'auto': the one the method options imply (sae_lora_rank, adapter,
    lm_lora_rank), else the SAE."""

    replacement: ReplacementMode = "independent"
    """Several transcoders (one per layer) trained together: 'independent' splices each alone,
    with its own KL; 'joint' splices all at once as one replacement model: one KL, each
    transcoder's MSE against its own clean target, gradients through the later transcoders
    (loss='kl+mse', one process)."""

    sae_lora_rank: int | None = None
    """Train only a rank-r update of the SAE's encoder and decoder (LoRA on the SAE, paper App. D),
    merged into the weights at the end: the result is a plain SAE of the same architecture. None:
    fine-tune every SAE parameter."""

    sae_lora_alpha: float = 32.0
    """LoRA on the SAE: the update is scaled by sae_lora_alpha / sae_lora_rank, as peft's
    lora_alpha (the paper's code: lora_alpha=32, so x16 at rank 2 and x0.5 at rank 64)."""

    adapter: AdapterKind | None = None
    """Train an adapter after the SAE instead of the SAE, which stays frozen (paper App. C):
    'linear': x_hat + U V x_hat (rank adapter_width, the up projection U zero-initialised, as the
    paper's released code); 'mlp': x_hat + W2 relu(W1 x_hat + b1) + b2 (hidden width
    adapter_width, last layer zero-initialised). It acts
    on the SAE's hook_sae_recons, is saved as save_dir/adapter.safetensors and re-attached with
    `load_adapter(save_dir, sae)`. Two-stage (paper): fine-tune first, then train an adapter
    after the fine-tuned SAE."""

    adapter_width: int = 16
    """Rank of the linear adapter / hidden width of the MLP adapter (the paper's code runs 16 and
    768 at d_model 2304)."""

    lm_lora_rank: int | None = None
    """Train rank-r LoRA updates of the language model's weights in the blocks after the SAE's hook
    instead of the SAE, which stays frozen (Chen et al. 2025); loss='kl' is theirs. The base
    weights are never changed: the updates act through hook points in the spliced pass only, and
    are saved as their own artifact, save_dir/lm_lora.safetensors (read with `load_lm_lora`)."""

    lm_lora_layers: LMLoRALayers = "after"
    """Which blocks LoRA on the LM adapts: 'after' the SAE's hook (the SAE's input is the clean
    activation), or 'all' (Chen et al.'s full-model LoRA: the blocks before the SAE change its
    input, so the spliced pass runs from the embedding and the frozen SAE encodes the adapted
    activation)."""

    init_seed: int = 0
    """Seed of the random initialisation of what a method adds (the LoRA factor A on the SAE or the
    LM, the adapter's down projection): runs with the same seed repeat; experiments' `--seeds`
    vary it."""

    decoder_unit_norm: bool | None = None
    """Keep every decoder row (W_dec[i]) at unit norm: each step removes the gradient's component
    along the row before the optimizer step and renormalises the rows after it, as the paper's
    code does in its full fine-tune (remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm). None: on when the SAE trains and its decoder rows start at
    unit norm (within 1e-4), off otherwise (an SAE whose rows carry scale would change)."""

    lr: float = 5e-5
    """Adam learning rate, decayed linearly to 0 over the fine-tune. 5e-5 is the paper's value for
    ~12k steps; short runs need a larger one (see docs/demo.md)."""

    lr_schedule: LRSchedule = "linear"
    """'linear': decayed linearly to 0 over the fine-tune (the paper's §3.3); 'constant': held at lr
    after the warm-up (the paper's Gemma runs, App. A.1)."""

    lr_warm_up_steps: int = 0
    """Linear warm-up steps before the decay."""

    continue_optimizer_from: str | None = None
    """A SAELens trainer checkpoint folder (holding trainer_state.pt), e.g. the final checkpoint of
    the MSE phase that trained this SAE: the fine-tune continues that Adam's moments and step
    counts instead of starting a fresh Adam, as the paper's A.1 runs continue one optimizer from
    the MSE phase into the KL phase (`train_with_kl_phase(continue_optimizer=True)` does this).
    The lr is still `lr` and `lr_schedule`. For fine-tuning one SAE itself (no adapter, LoRA)."""

    batch_size: int = 2
    """Sequences per step."""

    context_size: int | None = None
    """Tokens per sequence; default: the SAE metadata's context_size, else FALLBACK_CONTEXT_SIZE (1024)."""

    prepend_bos: bool | None = None
    """Put BOS at the start of every sequence; default: the SAE metadata's prepend_bos, else True."""

    eval_tokens: int = EVAL_TOKENS
    """Held-out tokens for the before/after evaluation, taken from the start of the data stream and
    never trained on (or from `eval_data`). 0 disables evaluation."""

    eval_batch_size: int = 4
    """Sequences per evaluation batch."""

    kl_chunk_tokens: int = KL_CHUNK_TOKENS
    """Tokens per chunk of the vocabulary projection; memory of the KL is chunk x vocab floats."""

    exclude_special_tokens: bool = True
    """Keep the clean activation at BOS/EOS/PAD positions and leave them out of every loss and metric,
    as SAELens does when training and evaluating."""

    exclude_first_positions: int = 0
    """Also keep the first N positions of every sequence clean (attention sinks with huge norms)."""

    sparsity_controller: ControllerMode = "auto"
    """Multiplicative controller on the sparsity coefficient (paper App. E): 'auto' turns it on for
    L1-penalised SAEs (standard, gated), 'on' also drives JumpReLU's L0 coefficient."""

    target_l0: float | None = None
    """L0 the controller holds; default: the SAE's L0 measured on the first training batch before
    any update."""

    controller_rate: float = 0.001
    """Each step: coefficient *= (1 - rate) if L0 < target else (1 + rate)."""

    sparsity_coefficient: float | None = None
    """Initial l1 (standard, gated) or l0 (jumprelu) coefficient; default: the value recorded in the
    SAE's metadata, else SAELens's default."""

    checkpoint_every_tokens: int | None = None
    """Save a resumable checkpoint every N training tokens (and always at the end) under
    save_dir/checkpoints. None: only the final one."""

    keep_checkpoints: int = 3
    """Checkpoints kept under save_dir/checkpoints: older ones are deleted once a newer one is
    written (the final checkpoint is always kept)."""

    device: str | None = None
    """Device of the SAE and tokens; must be the model's device (the default)."""

    sparse_topk: bool | None = None
    """TopK SAEs (topk, abstopk, batchtopk, matryoshka_batchtopk) train at the cost of their chosen
    latents: the encoder's backward reads only the nonzero entries of its gradient, and TopK's
    latents are SAELens's sparse activations (COO, a sparse decode and decoder gradient). The
    same outputs and gradients to float rounding. None: on for CPU, where it measured faster
    (GPT-2-small shape, k=64 of 12288 latents, 2 threads: see docs/performance.md); off on GPU,
    where it has not been measured."""

    prefix_reuse: bool = True
    """Run the layers before the SAE's block once and continue from there with start_at_layer. False
    (or a model without start_at_layer) runs two full hooked forwards per step."""

    compile_blocks: bool | None = None
    """Run the model's blocks through torch.compile (inductor) in the training step; the block
    holding the SAE's hook, and any block with a hook registered, stays eager. Same results to float
    rounding (SAE gradients within 4e-7 relative of eager). None: decided by measurement
    (compile_probe.py): a short timed probe of one block, eager vs compiled, cached per model
    shape, batch shape, torch version, device and threads, compiles when it saves at least 5 % of
    the blocks' time and the run's steps repay the compile (with nothing cached, runs under 200
    steps or whose blocks take under a minute eagerly are not probed); inductor failing in the
    probe means eager. The decision and its figures are in the report (`compile_blocks`). True
    needs what inductor needs (a C++ compiler on CPU, Triton on GPU), prefix_reuse and a
    single-device HookedTransformer."""

    distributed: bool = False
    """Data parallelism over an initialised torch.distributed process group (torchrun, one process
    per device, each given the same model, SAE, data and settings): each rank takes its slice of
    every batch of `batch_size` sequences (which the world size must divide), gradients are summed
    over the ranks, alpha, the L0 controller and the evaluation use every rank's tokens, rank 0
    writes. The result equals one process's over the same batches, to float rounding."""

    checkpoint_suffix: bool = False
    """Gradient checkpointing of the spliced suffix: the activations of the blocks after the SAE's
    are recomputed in backward, one block at a time, instead of kept, for when they do not fit in
    memory (a step runs those blocks forward once more). Same results, bit for bit. Needs
    prefix_reuse on a HookedTransformer; not with LoRA on the LM."""

    check_model_name: bool = True
    """Refuse an SAE whose metadata names a different model than the one passed."""

    dead_feature_window: int = 1000
    """Steps without firing after which a latent counts as dead (SAELens trainer)."""

    feature_sampling_window: int = 2000
    """Steps per sparsity-statistics window (SAELens trainer)."""

    log_to_wandb: bool = field(default=False, metadata={"aliases": ("--wandb",)})
    """Log through SAELens's wandb logger."""

    wandb_project: str = "sae_lens_kl"
    """wandb project when log_to_wandb is set."""

    wandb_log_frequency: int = 10
    """Steps between wandb logs."""

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in (
            "lr",
            "kl_coefficient",
            "downstream_coefficient",
            "controller_rate",
            "target_l0",
            "sparsity_coefficient",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ValueError(f"{name}={value!r} must be a finite number.")
        if self.sae_lora_alpha <= 0 or not math.isfinite(self.sae_lora_alpha):
            raise ValueError(f"sae_lora_alpha={self.sae_lora_alpha!r} must be a positive number.")
        for name in (
            "kl_coefficient",
            "downstream_coefficient",
            "target_l0",
            "sparsity_coefficient",
            "init_seed",
        ):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0.")
        if self.lr_schedule not in get_args(LRSchedule):
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not one of {get_args(LRSchedule)}.")
        if self.loss not in LOSS_MODES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSS_MODES}.")
        if self.replacement not in REPLACEMENT_MODES:
            raise ValueError(f"replacement={self.replacement!r} is not one of {REPLACEMENT_MODES}.")
        if self.replacement == "joint" and self.loss != "kl+mse":
            raise ValueError(
                f"replacement='joint' trains with the paper's loss per transcoder; loss={self.loss!r} is "
                "not supported for it yet (use loss='kl+mse')."
            )
        if self.sparsity_controller not in CONTROLLER_MODES:
            raise ValueError(
                f"sparsity_controller={self.sparsity_controller!r} is not one of {CONTROLLER_MODES}."
            )
        positive = {
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "kl_chunk_tokens": self.kl_chunk_tokens,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.context_size is not None and self.context_size < 2:
            raise ValueError(f"context_size={self.context_size} must be at least 2 tokens.")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive.")
        if self.eval_tokens < 0:
            raise ValueError(f"eval_tokens={self.eval_tokens} must be >= 0 (0 disables evaluation).")
        if not 0 < self.controller_rate < 1:
            raise ValueError(f"controller_rate={self.controller_rate} must lie in (0, 1).")
        if self.checkpoint_every_tokens is not None and self.checkpoint_every_tokens <= 0:
            raise ValueError("checkpoint_every_tokens must be positive or None.")
        if self.lr_warm_up_steps < 0:
            raise ValueError(f"lr_warm_up_steps={self.lr_warm_up_steps} must be >= 0.")
        for name in ("dead_feature_window", "feature_sampling_window", "wandb_log_frequency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1 (steps).")
        if self.exclude_first_positions < 0:
            raise ValueError("exclude_first_positions must be >= 0.")
        if self.sae_lora_rank is not None and (
            not isinstance(self.sae_lora_rank, int) or self.sae_lora_rank < 1
        ):
            raise ValueError(f"sae_lora_rank={self.sae_lora_rank!r} must be a positive integer or None.")
        if self.adapter is not None and self.adapter not in ADAPTER_KINDS:
            raise ValueError(f"adapter={self.adapter!r} is not one of {ADAPTER_KINDS} (or None).")
        if not isinstance(self.adapter_width, int) or self.adapter_width < 1:
            raise ValueError(f"adapter_width={self.adapter_width!r} must be a positive integer.")
        if self.lm_lora_rank is not None and (
            not isinstance(self.lm_lora_rank, int) or self.lm_lora_rank < 1
        ):
            raise ValueError(f"lm_lora_rank={self.lm_lora_rank!r} must be a positive integer or None.")
        if self.lm_lora_layers not in LM_LORA_LAYERS:
            raise ValueError(f"lm_lora_layers={self.lm_lora_layers!r} is not one of {LM_LORA_LAYERS}.")
        if self.lm_lora_layers != "after" and self.lm_lora_rank is None:
            raise ValueError(f"lm_lora_layers={self.lm_lora_layers!r} needs lm_lora_rank (LoRA on the LM).")
        if self.lm_lora_rank is not None and not _reads_the_spliced_model(self):
            raise ValueError(
                f"lm_lora_rank with loss={self.loss!r}: it does not read the spliced model's later "
                "blocks, which LoRA adapts, so nothing would train; use loss='kl' (Chen et al.) or "
                "'kl+mse'."
            )
        methods = {
            "adapter": self.adapter,
            "sae_lora_rank": self.sae_lora_rank,
            "lm_lora_rank": self.lm_lora_rank,
        }
        chosen = [name for name, value in methods.items() if value is not None]
        if len(chosen) > 1:
            raise ValueError(
                f"{' and '.join(chosen)} both set: each trains one thing (an adapter or LoRA on the LM "
                "with the SAE frozen, LoRA on the SAE); run them one after the other (two calls)."
            )
        if self.continue_optimizer_from is not None and chosen:
            raise ValueError(
                f"continue_optimizer_from with {chosen[0]}: it continues the SAE's own Adam state, "
                f"but {chosen[0]} trains other parameters; fine-tune the SAE itself, or drop it."
            )
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints!r} must be a positive integer.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def options_in(cls, namespace: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """The values of this config's fields found as attributes of `namespace` (parsed command
        line flags), less `drop`."""
        names = [f.name for f in fields(cls) if f.name not in drop and hasattr(namespace, f.name)]
        return {name: getattr(namespace, name) for name in names}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KLFinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown KLFinetuneConfig fields {unknown}; known: {sorted(known)}.")
        return cls(**values)


def _reads_the_spliced_model(cfg: KLFinetuneConfig) -> bool:
    # imported here: losses imports torch, and this module stays light for the CLI's --help
    from sae_lens_kl.losses import needs_spliced_run, objective_of

    return needs_spliced_run(objective_of(cfg))
