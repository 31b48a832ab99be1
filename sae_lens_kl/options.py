"""What each `sae-lens-kl` subcommand takes, written once as small dataclasses: a field's name,
type, default and docstring become its flag and --help text (`flags.add_flags`). The fine-tune's
own options are `KLFinetuneConfig`'s fields. (Nothing heavy is imported: --help stays fast.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sae_lens_kl.config import AttributionMethod, ExperimentName, TrainingArchitecture
from sae_lens_kl.flags import positive_int
from sae_lens_kl.recipes import DEMO_HOOK, DEMO_KL_LR, DEMO_MSE_RECIPE, DEMO_SIZES, KL_BATCH_SEQUENCES


@dataclass
class Common:
    config: str | None = None
    """YAML or JSON file of option values (flags on the command line win)."""
    threads: int | None = field(default=None, metadata={"parse": positive_int})
    """torch CPU threads (default: torch's own: OMP_NUM_THREADS, else all cores). Oversubscribed
    threads slow a step many times."""


@dataclass
class Output:
    out: str | None = None
    """Output folder."""
    overwrite: bool = False
    """Replace an existing output folder's files."""


@dataclass
class DemoRun:
    """The demo's run lengths (shared by demo, experiment, sweep and sparsity)."""

    lr: float = DEMO_KL_LR
    """KL-phase learning rate (chosen with `sae-lens-kl sweep`; the paper's 5e-5 is for ~12k steps)."""
    kl_steps: int | None = None
    kl_batch: int = field(default=KL_BATCH_SEQUENCES, metadata={"parse": positive_int})
    """Sequences per KL-phase step (Adam's step is scaled by the gradient's running RMS, so its size
    depends little on the batch: at equal tokens, smaller batches take more steps and, measured on
    the demo, move the SAE further; chosen with `sae-lens-kl sweep`)."""
    mse_tokens: int | None = None
    eval_tokens: int | None = None


@dataclass
class DemoModel:
    model: str = "smollm2"
    """Model ('smollm2': the offline SmolLM2; 'gemma3-270m': the offline Gemma-3-270m)."""
    hook: str = DEMO_HOOK
    """Hook point."""
    d_sae: int | None = None
    k: int = int(DEMO_MSE_RECIPE.k)
    """TopK k."""
    context_size: int = DEMO_MSE_RECIPE.context_size
    """Tokens per sequence."""
    normalize_activations: Literal["none", "expected_average_only_in"] = DEMO_MSE_RECIPE.normalize_activations  # type: ignore[assignment]
    """The MSE phase's input normalisation (SAELens's; folded into the weights at the end)."""
    b_dec_init: Literal["zeros", "mean"] = DEMO_MSE_RECIPE.b_dec_init  # type: ignore[assignment]
    """Where the MSE phase's decoder bias starts: zeros (SAELens's) or the activations' mean."""
    data: str | None = None
    """Training text (default: Django's docs, from PyPI)."""
    eval_data: str | None = None
    """Held-out text (default: Django's held-out files)."""


@dataclass
class DemoOptimizer:
    kl_optimizer: Literal["fresh", "continued"] = "fresh"
    """The KL phase's Adam (every arm's): 'fresh' (a new one, as for fine-tuning a pretrained SAE)
    or 'continued' (the MSE phase's moments and step count, cached with its SAE, as the paper's
    A.1 runs carry one Adam across both phases; unlike A.1's constant lr, the lr still starts at
    --lr and decays to 0, as the demo's MSE phase's did)."""


@dataclass
class DemoControls:
    controls: list[str] = field(default_factory=lambda: ["mse"], metadata={"comma": True})
    no_control: bool = False
    """Run no control (only the KL+MSE phase)."""


@dataclass
class DemoKLSource:
    no_kl_cache: bool = False
    """Run the clean pass at every KL step, as the sweep does, instead of reading the KL phase's
    tokens from a clean-pass cache (the residual entering the SAE's block, the SAE's input and the
    clean distribution's statistics: the same KL and gradients to float rounding), built by the
    first run on those tokens (~340 MB per 49,152 tokens in the cache folder) and read by every
    arm that changes only the loss, to one that reads nothing after the SAE's hook (adapters,
    LoRA and e2e+ds arms run the clean pass at every step)."""


@dataclass
class ExperimentOptions:
    name: ExperimentName = field(default="A", metadata={"positional": True})
    """Which experiment."""
    quick: bool = False
    seeds: int = 1
    """Run every arm this many times: seed s trains on the s-th block of KL-phase tokens with
    init_seed s (arms from scratch also seed their MSE phase); tables give the mean and intervals
    that draw seeds as well as held-out sequences."""


@dataclass
class SweepOptions:
    lrs: list[float] = field(default_factory=lambda: [1e-4, 2e-4, 4e-4], metadata={"comma": True})
    """Comma-separated KL-phase lrs."""
    steps: list[int] = field(default_factory=lambda: [48, 96, 192], metadata={"comma": True})
    """Comma-separated step counts (of --kl-batch sequences: at the default 2, 192 steps are the
    demo's 49,152 tokens)."""
    eval_split: Literal["validation", "test"] = "validation"
    """Held-out sequences every cell is evaluated on: 'validation', as many as the demo's, each
    between two of them over the whole held-out text (with the demo's --eval-tokens, --context-size
    and --eval-data, a recipe chosen here is then reported by the demo on sequences it was not
    chosen on; other sizes pick from another grid), or 'test', the demo's own."""
    quick: bool = False
    """The experiments' minutes-long size."""


@dataclass
class SparsityOptions:
    ks: list[int] = field(default_factory=lambda: [8, 16, 32, 64], metadata={"comma": True})
    """Comma-separated TopK k values."""
    kl_share: float = 0.05
    """The KL phase's share of the run's tokens (the paper's 5 %)."""
    end_to_end: bool = False
    """Also train end to end (KL+MSE on all the run's tokens, at the MSE phase's lr and batches):
    per k about as long as the KL step on the whole MSE phase's tokens."""
    quick: bool = False
    """The experiments' minutes-long size."""


@dataclass
class FinetuneOptions:
    sae: str | None = None
    """RELEASE:SAE_ID (needs the hub) or a local SAE folder."""
    model: str | None = None
    """TransformerLens model name, local HF folder, .gguf file, 'smollm2' or 'gemma3-270m'
    (default: the SAE metadata's model_name)."""
    data: str | None = None
    """Dataset name, local text file/folder (default: the SAE metadata's dataset_path)."""
    eval_data: str | None = None
    """Held-out evaluation data (default: the first --eval-tokens of --data, never trained on)."""
    resume: str | None = None
    """Continue a killed run from its output folder or a checkpoint."""


@dataclass
class TrainOptions:
    model: str = "smollm2"
    """Model ('smollm2': the offline SmolLM2)."""
    hook: str = DEMO_HOOK
    """Hook point."""
    architecture: TrainingArchitecture = "topk"
    """SAE architecture."""
    k: float = 32
    """TopK/BatchTopK k."""
    d_sae: int = DEMO_MSE_RECIPE.d_sae
    """Latents."""
    training_tokens: int = 200_000
    """Total tokens, both phases."""
    kl_fraction: float = 0.05
    """Share of tokens in the KL+MSE phase."""
    mse_lr: float = DEMO_MSE_RECIPE.lr
    """MSE-phase learning rate."""
    train_batch_size_tokens: int = DEMO_MSE_RECIPE.batch_tokens
    """MSE-phase batch."""
    seed: int = DEMO_MSE_RECIPE.seed
    """Seeds the MSE phase: SAE initialisation and activation shuffling."""
    data: str | None = None
    """Training text (default: the Django docs corpus)."""
    eval_data: str | None = None
    """Held-out text (default: the corpus's held-out files)."""
    continue_optimizer: bool = False
    """The paper's A.1 recipe: the KL phase continues the MSE phase's Adam at --mse-lr, constant
    (one optimizer and one lr for both phases; --lr and --lr-schedule do not apply). Default: a
    fresh Adam at --lr, decayed to 0."""


@dataclass
class CacheOptions:
    model: str = "smollm2"
    """Model."""
    hook: str | None = None
    """Hook point, e.g. blocks.6.hook_resid_pre."""
    data: str | None = None
    """Text or dataset (default: the Django docs corpus)."""
    tokens: int = 100_000
    """Tokens to cache."""
    context_size: int = DEMO_MSE_RECIPE.context_size
    """Tokens per sequence."""
    prepend_bos: bool = True
    """A BOS token at the start of each sequence."""


@dataclass
class EvalOptions:
    sae: list[str] | None = field(default=None, metadata={"repeat": True})
    """RELEASE:SAE_ID or a local SAE folder; repeat to compare."""
    model: str | None = None
    """Model (default: the first SAE's metadata model_name)."""
    data: str | None = None
    """Evaluation data (default: the corpus's held-out files)."""
    n_tokens: int = DEMO_SIZES["eval_tokens"]
    """Tokens to evaluate."""
    context_size: int | None = None
    """Tokens per sequence (default: the SAE's)."""
    batch_size: int = 4
    """Sequences per batch."""
    exclude_first_positions: int = 0
    """Positions left out at the start of each sequence."""


@dataclass
class SAEBenchOptions:
    sae: list[str] = field(default_factory=list, metadata={"repeat": True})
    """NAME=PATH_OR_RELEASE:SAE_ID; repeat (the first is the baseline of the differences). A folder
    kl_finetune wrote alone (--sae after=FOLDER) brings its starting SAE as 'before'."""
    evals: str = "core,absorption,meta_structure"
    """Comma-separated evals."""
    model: str | None = None
    """Model (default: the first SAE's metadata model_name)."""
    data: str | None = None
    """core's text (default: Django's held-out docs, from PyPI)."""
    absorption_words: int | None = field(default=None, metadata={"parse": positive_int})
    """Evaluate absorption on a seeded sample of this many of the tokenizer's alphabetic tokens
    (default: all, as SAEBench; hours on a CPU)."""
    eval_config: str | None = None
    """JSON of SAEBench config fields per eval, e.g. '{"core": {"context_size": 256}}'."""
    quick: bool = False
    """Small sizes (minutes on a CPU; a smoke test)."""
    device: str | None = None
    """Device (default: cpu)."""


@dataclass
class CircuitsOptions:
    sae: list[str] | None = field(default=None, metadata={"repeat": True})
    """NAME=SAE (RELEASE:SAE_ID or a folder); repeat."""
    model: str | None = None
    """Model (default: the first SAE's model_name)."""
    data: str | None = None
    """Text for the prompts (default: the corpus's held-out files)."""
    prompts: int = field(default=16, metadata={"parse": positive_int})
    """Prompts."""
    length: int = field(default=24, metadata={"parse": positive_int})
    """Tokens per repeated span."""
    sizes: list[int] = field(default_factory=lambda: [1, 3, 10, 30, 100, 300, 1000], metadata={"comma": True})
    """Numbers of top latents for the faithfulness curve."""
    method: AttributionMethod = "atp"
    """Scores: attribution patching (atp, one backward pass) or integrated gradients (ig,
    --ig-steps backward passes per hook)."""
    ig_steps: int = field(default=10, metadata={"parse": positive_int})
    """Integrated-gradients steps."""


@dataclass
class ExportOptions:
    format: Literal["circuit-tracer"] = field(default="circuit-tracer", metadata={"positional": True})
    """The format: circuit-tracer's local transcoder set (circuit-tracer 0.5.0)."""
    set: list[str] | None = field(default=None, metadata={"repeat": True})
    """A transcoder folder (SAELens's layout) per layer, in layer order; or one run folder of a
    several-per-pass fine-tune (its sae_0, sae_1, ... subfolders)."""
    n_layers: int | None = field(default=None, metadata={"parse": positive_int})
    """The model's layer count (required), checked against the set: circuit-tracer needs one
    transcoder per layer and treats a missing one as all error nodes."""
    scan: str | None = None
    """The set's name in circuit-tracer's graphs (default: model name and hooks)."""
