"""The demo and its family: `demo`, `experiment`, `sweep` and `sparsity` on the demo's model, text,
MSE-phase SAE (cached) and shared held-out evaluator (`DemoSetup`)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, TrainingSAE
from sae_lens.constants import TRAINER_STATE_FILENAME

from sae_lens_kl.cache import CACHE_FILENAME, FORMAT_VERSION, CleanPassCache, build_cache
from sae_lens_kl.checkpoints import sae_fingerprint
from sae_lens_kl.commands.common import SINK_NOTE, check_out, text_or_corpus
from sae_lens_kl.config import KL_CHUNK_TOKENS, LOSS_MODES
from sae_lens_kl.data import token_sequences
from sae_lens_kl.evaluation import HeldOutEvaluator
from sae_lens_kl.intervals import format_interval
from sae_lens_kl.losses import OBJECTIVES
from sae_lens_kl.models import cache_root, load_model
from sae_lens_kl.recipes import DEMO_MSE_RECIPE, DEMO_SIZES, QUICK_SIZES, MSERecipe
from sae_lens_kl.report import History, write_report
from sae_lens_kl.staging import staged_folder
from sae_lens_kl.train import final_checkpoint, mse_phase, mse_phase_sequences

if TYPE_CHECKING:
    from sae_lens_kl.experiments import Experiment

CONTROL_NAMES = {"mse": "MSE-only control", "kl": "KL-only", "e2e+ds": "e2e+ds"}
HELD_OUT_READ_FACTOR = 32
"""The held-out sequences are spread over at most this many times the sequences they need (a
large --eval-data is not read to its end)."""


def mse_cache_folder(runner_cfg: LanguageModelSAERunnerConfig[Any], b_dec_init: str = "zeros") -> Path:
    """Where the MSE-phase SAE of this configuration is cached (a SAELens folder)."""
    key_fields = {
        "model": runner_cfg.model_name,
        "hook": runner_cfg.hook_name,
        "sae": runner_cfg.sae.to_dict(),
        "tokens": runner_cfg.training_tokens,
        "ctx": runner_cfg.context_size,
        "lr": runner_cfg.lr,
        "batch": runner_cfg.train_batch_size_tokens,
        "seqpos": runner_cfg.seqpos_slice,
        "data": runner_cfg.dataset_path,
        "seed": runner_cfg.seed,
        "dead_feature_window": runner_cfg.dead_feature_window,
        "lr_decay_steps": runner_cfg.lr_decay_steps,
    }
    # key fields only where they differ from SAELens's defaults: older keys stay valid
    if runner_cfg.sae.normalize_activations != "none":
        key_fields["norm_estimate_batches"] = runner_cfg.n_batches_for_norm_estimate
    if b_dec_init != "zeros":
        key_fields["b_dec_init"] = b_dec_init
    if runner_cfg.n_batches_in_buffer != 32:  # every recipe's value before it was keyed
        key_fields["n_batches_in_buffer"] = runner_cfg.n_batches_in_buffer
    key = hashlib.sha1(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "mse_saes" / key


def cached_mse_sae(
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    model: Any,
    data: Any,
    b_dec_init: str = "zeros",
    with_optimizer: bool = False,
) -> tuple[TrainingSAE[Any], bool]:
    """The MSE-phase SAE for this configuration, trained once and then read from the cache. The
    cache folder also keeps the MSE phase's final Adam state (SAELens's trainer_state.pt, a
    `continue_optimizer_from` folder); `with_optimizer`: a cached SAE saved without it (by a
    version before --kl-optimizer) is trained again."""
    folder = mse_cache_folder(runner_cfg, b_dec_init)
    cached = (folder / "cfg.json").is_file()
    if cached and (not with_optimizer or (folder / TRAINER_STATE_FILENAME).is_file()):
        return TrainingSAE.load_from_disk(folder, device=str(model.cfg.device)), True
    with tempfile.TemporaryDirectory(prefix="mse-phase-") as checkpoints:
        sae = mse_phase(runner_cfg, model, data, runner_cfg.training_tokens, Path(checkpoints), b_dec_init)
        if cached and sae_fingerprint(sae) != sae_fingerprint(TrainingSAE.load_from_disk(folder)):
            # results already measured from the cached SAE must keep their start
            raise SystemExit(
                f"The cached MSE-phase SAE in {folder} was saved without its Adam state, and training it "
                "again here gives other weights (another machine's rounding?), so its Adam state cannot "
                "be recovered; use --kl-optimizer fresh, or delete that folder to train and cache anew."
            )
        with staged_folder(folder) as staging:
            sae.save_model(staging)
            shutil.copy(final_checkpoint(Path(checkpoints)) / TRAINER_STATE_FILENAME, staging)
    return sae, False


def demo_start(setup: DemoSetup, args: argparse.Namespace) -> tuple[TrainingSAE[Any], bool]:
    """The cached MSE-phase SAE every arm of the demo or the sweep starts from (and whether it was
    cached); with --kl-optimizer continued, every arm's fine-tune continues its Adam."""
    continued = args.kl_optimizer == "continued"
    runner_cfg, b_dec_init = setup.runner_cfg, setup.recipe.b_dec_init
    sae, cached = cached_mse_sae(
        runner_cfg, setup.model, setup.train_data, b_dec_init, with_optimizer=continued
    )
    if continued:
        setup.options["continue_optimizer_from"] = str(mse_cache_folder(runner_cfg, b_dec_init))
    return sae, cached


@dataclasses.dataclass
class DemoSetup:
    """What the demo and the experiments share: the model, training and held-out text, the MSE
    phase's runner config, the KL phase's length, the fine-tune options of every run and the
    evaluator of every run (the held-out clean pass is computed once for all of them)."""

    model: Any
    train_data: Any
    eval_data: Any
    recipe: MSERecipe
    runner_cfg: LanguageModelSAERunnerConfig[Any]
    kl_tokens: int
    options: dict[str, Any]
    evaluator: HeldOutEvaluator | None
    eval_split: str = "test"
    """Which held-out sequences the evaluator holds: the demo's ('test') or the sweep's
    ('validation', the sequences between the demo's)."""
    kl_cache: bool = False
    """Whether fine-tunes whose loss reads nothing after the SAE's hook train from a clean-pass
    cache of their KL-phase tokens (`kl_source`) instead of running the clean pass every step."""

    @property
    def sinks(self) -> int:
        return self.recipe.sink_positions

    def held_out(self) -> dict[str, Any]:
        """The keyword that gives a fine-tune its held-out evaluation: the shared evaluator."""
        return {"evaluator": self.evaluator} if self.evaluator is not None else {"eval_data": self.eval_data}

    def runner_config_for(
        self,
        architecture: str,
        tokens: int | None = None,
        seed: int = 0,
        k: float | None = None,
        constant_lr: bool = False,
    ) -> LanguageModelSAERunnerConfig[Any]:
        """The MSE phase's config for another architecture (same width, data, lr), length, seed
        (added to the demo's runner seed), TopK k, or at a constant lr (no final decay)."""
        recipe = self.recipe
        if (architecture, tokens, seed, k, constant_lr) == (recipe.architecture, None, 0, None, False):
            return self.runner_cfg
        recipe = dataclasses.replace(
            recipe,
            architecture=architecture,
            tokens=tokens or recipe.tokens,
            seed=recipe.seed + seed,
            k=recipe.k if k is None else k,
            lr_decay_fraction=0.0 if constant_lr else recipe.lr_decay_fraction,
        )
        return recipe.runner_config(self.model, self.runner_cfg.hook_name, self.runner_cfg.dataset_path)

    def kl_source(self, sequences: torch.Tensor, stage: dict[str, Any]) -> torch.Tensor | CleanPassCache:
        """What a fine-tune stage with options `stage` reads its KL-phase `sequences` from: with
        `kl_cache`, and when the stage sets nothing but a loss that reads nothing after the SAE's
        hook, their clean-pass cache (cache.py: the residual entering the SAE's block, the SAE's
        input and the clean next-token distribution's statistics, so that a KL step runs only the
        spliced suffix and an MSE-only step only the SAE; the same KL and gradients to float
        rounding), built on first use in the cache folder and read by every later run on the
        same tokens; otherwise the sequences themselves."""
        loss = stage.get("loss", "kl+mse")
        if not self.kl_cache or set(stage) - {"loss"} or OBJECTIVES[loss].takes_downstream_hooks:
            return sequences
        model, hook = self.model, self.runner_cfg.hook_name
        # two local models of one name and shape (checkpoints of one run) differ in their weights
        weights = hashlib.sha1()
        for parameter in model.parameters():
            weights.update(parameter.detach().flatten()[:64].cpu().numpy().tobytes())
        key_fields = {
            "format": FORMAT_VERSION,
            "model": [model.cfg.model_name, model.cfg.d_model, model.cfg.n_layers, str(model.cfg.dtype)],
            "weights": weights.hexdigest(),
            "hook": hook,
            "bos": bool(self.runner_cfg.prepend_bos),
            "tokens": hashlib.sha1(sequences.numpy().tobytes()).hexdigest(),
            "shape": list(sequences.shape),
        }
        key = hashlib.sha1(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
        folder = cache_root() / "clean_passes" / key
        if (folder / CACHE_FILENAME).is_file():
            return CleanPassCache(folder)
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted build's shards (no cache.json)
        return build_cache(
            model,
            sequences,
            hook,
            folder,
            tokens=sequences.numel(),
            context_size=sequences.shape[1],
            prepend_bos=bool(self.runner_cfg.prepend_bos),
            chunk_tokens=self.options["kl_chunk_tokens"],
        )

    def check_fits(self, kl_tokens: int) -> None:
        """Refuse, before any training, a run whose MSE phase (with what its mixing buffer reads
        ahead, train.mse_phase_sequences) and `kl_tokens` after it, as whole sequences of the
        run's context, need more training tokens than the data holds."""
        cfg = self.runner_cfg
        context = cfg.context_size
        mse_sequences = mse_phase_sequences(
            cfg, self.model, self.train_data, cfg.training_tokens, self.recipe.b_dec_init
        )
        needed = None if mse_sequences is None else mse_sequences - (-kl_tokens // context)
        stream = token_sequences(self.train_data, self.model, context, cfg.prepend_bos)
        if needed is None or next(itertools.islice(stream, needed - 1, None), None) is None:
            raise SystemExit(
                f"The training data ({self.train_data}) holds fewer than the "
                f"{'' if needed is None else f'{needed:,} '}sequences of {context} tokens that this run "
                f"reads (the MSE phase's {cfg.training_tokens:,} tokens, with what its mixing buffer "
                f"reads ahead, then {kl_tokens:,}); pass more --data, or fewer --mse-tokens, "
                "--kl-steps, --steps or --seeds."
            )


def demo_setup(args: argparse.Namespace, quick: bool = False) -> DemoSetup:
    """The demo's setup; sizes not given on the command line take the demo's (or quick) values."""
    for name, value in (QUICK_SIZES if quick else DEMO_SIZES).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.b_dec_init == "mean" and args.normalize_activations != "none":
        raise SystemExit(
            "--b-dec-init mean (the default) starts b_dec at the raw activations' mean, which "
            "--normalize-activations rescales; pass --b-dec-init zeros with it."
        )
    if args.eval_tokens < 0:
        raise SystemExit(f"--eval-tokens {args.eval_tokens} must be >= 0 (0: no held-out evaluation).")
    if getattr(args, "kl_optimizer", "fresh") == "continued" and args.normalize_activations != "none":
        raise SystemExit(
            "--kl-optimizer continued with --normalize-activations: the MSE phase's Adam moments are "
            "for the normalised weights, which SAELens rescales at the end; use one or the other."
        )
    model = load_model(args.model)
    train_data, eval_data = text_or_corpus(args.data, args.eval_data)
    recipe = dataclasses.replace(
        DEMO_MSE_RECIPE,
        d_sae=args.d_sae,
        k=args.k,
        tokens=args.mse_tokens,
        context_size=args.context_size,
        normalize_activations=args.normalize_activations,
        b_dec_init=args.b_dec_init,
    )
    context_size, batch_size, sinks = recipe.context_size, args.kl_batch, recipe.sink_positions
    # the SAE metadata's dataset_path: a local folder that `finetune` can read again
    runner_cfg = recipe.runner_config(model, args.hook, dataset_name=str(train_data))
    options = {
        "batch_size": batch_size,
        "lr": args.lr,
        "eval_tokens": args.eval_tokens,
        "eval_batch_size": 8,
        "exclude_first_positions": sinks,
        "kl_chunk_tokens": KL_CHUNK_TOKENS,
    }
    kl_tokens = args.kl_steps * batch_size * context_size
    eval_split = getattr(args, "eval_split", "test")  # only the sweep has --eval-split
    evaluator = (
        HeldOutEvaluator.for_data(
            model,
            _held_out(args, eval_split, model, eval_data, context_size, bool(runner_cfg.prepend_bos)),
            n_tokens=args.eval_tokens,
            context_size=context_size,
            prepend_bos=bool(runner_cfg.prepend_bos),
            batch_size=options["eval_batch_size"],
            exclude_first_positions=sinks,
            chunk_tokens=options["kl_chunk_tokens"],
        )
        if args.eval_tokens
        else None
    )
    return DemoSetup(
        model, train_data, eval_data, recipe, runner_cfg, kl_tokens, options, evaluator, eval_split
    )


def _held_out(
    args: argparse.Namespace,
    eval_split: str,
    model: Any,
    eval_data: Any,
    context_size: int,
    prepend_bos: bool,
) -> torch.Tensor:
    """The held-out sequences every run is evaluated on: --eval-tokens of them, spread evenly over
    the held-out text (its files are read in name order, so its first tokens would be a few files
    of one kind), each between two of as many others, the validation split (`sweep --eval-split
    validation`), so that the recipe the demo reports is not chosen on the demo's own sequences.
    Reads at most HELD_OUT_READ_FACTOR times the sequences both splits need."""
    n_split = -(-args.eval_tokens // context_size)
    stream = token_sequences(eval_data, model, context_size, prepend_bos)
    every = list(itertools.islice(stream, HELD_OUT_READ_FACTOR * 2 * n_split))
    if len(every) < 2 * n_split:
        raise SystemExit(
            f"The held-out text ({eval_data}) holds {len(every)} sequences of {context_size} tokens; "
            f"--eval-tokens {args.eval_tokens:,} evaluates on {n_split} and keeps {n_split} others as "
            "the sweep's validation split: pass fewer --eval-tokens or more --eval-data."
        )
    picks = [every[i * len(every) // (2 * n_split)] for i in range(2 * n_split)]
    split = picks[1::2] if eval_split == "validation" else picks[0::2]
    if len(every) == HELD_OUT_READ_FACTOR * 2 * n_split:
        print(f"Held-out sequences spread over the first {len(every):,} of {eval_data}'s.")
    return torch.stack(split)


def demo_experiment(controls: list[str]) -> Experiment:
    """The demo as an experiment: experiment A's KL+MSE arm and the controls asked for (default the
    MSE-only continuation, the reference its paired difference is taken from)."""
    from sae_lens_kl.experiments import EXPERIMENTS, Arm, Experiment

    control_arms = tuple(Arm(CONTROL_NAMES.get(loss, loss), ({"loss": loss},)) for loss in controls)
    return Experiment(
        "sae_lens_kl demo: KL+MSE phase after MSE training, and its controls on the same tokens",
        EXPERIMENTS["A"].paper,
        (Arm("KL+MSE"), *control_arms),
        reference=CONTROL_NAMES["mse"] if "mse" in controls else None,
    )


def demo(args: argparse.Namespace) -> None:
    from sae_lens_kl.experiments import run_experiment

    unknown = [loss for loss in args.controls if loss not in LOSS_MODES]
    if unknown:
        raise SystemExit(f"--controls {','.join(unknown)}: not a loss; choose from {', '.join(LOSS_MODES)}.")
    out = check_out(args.out, args.overwrite)
    assert out is not None
    setup = demo_setup(args)
    setup.check_fits(setup.kl_tokens)
    setup.kl_cache = not args.no_kl_cache
    model, train_data, runner_cfg = setup.model, setup.train_data, setup.runner_cfg
    hook, sinks, kl_tokens = args.hook, setup.sinks, setup.kl_tokens
    batch_size, context_size = setup.options["batch_size"], args.context_size
    print(
        f"MSE phase: SAELens runner, TopK k={args.k}, d_sae={args.d_sae} at {hook}, "
        f"{args.mse_tokens:,} tokens"
    )
    mse_sae, cached = demo_start(setup, args)
    print("  (read from cache)" if cached else "  (trained and cached)")
    total = args.mse_tokens + kl_tokens
    history = History()
    print(f"KL+MSE phase: {args.kl_steps} steps of {batch_size}x{context_size} tokens, lr {args.lr}")
    # The KL+MSE arm and the controls on the same tokens from the same MSE-phase SAE: the MSE-only
    # continuation (paper App. B) and any other objective asked for (KL-only, e2e+ds, ...).
    result = run_experiment(
        "demo",
        setup,
        lambda *_, **__: mse_sae,
        out,
        overwrite=args.overwrite,
        experiment=demo_experiment([] if args.no_control else args.controls),
        callbacks={"KL+MSE": [history]},
        start_sae=str(mse_cache_folder(runner_cfg, setup.recipe.b_dec_init)),
    )
    runs = {name: seeds[0][-1] for name, seeds in result["reports"].items()}
    extra: dict[str, Any] = {
        "mse_phase_cached": cached,
        "kl_tokens_share_of_run": kl_tokens / total,
        "kl_clean_pass": "clean-pass cache" if setup.kl_cache else "every step",
    }
    if result["intervals"] is not None:
        # every run was evaluated on the same held-out sequences: paired intervals
        extra["intervals"] = result["intervals"][setup.recipe.architecture]
    notes = [
        f"Model: {model.cfg.model_name}; SAE: TopK k={args.k}, d_sae={args.d_sae} at {hook}, MSE-trained "
        f"with SAELens's runner on {args.mse_tokens:,} tokens of {train_data}.",
        f"KL phase: {kl_tokens:,} tokens = {kl_tokens / total:.1%} of the run's {total:,}.",
        (
            f"KL phase's clean pass: read from a clean-pass cache under {cache_root() / 'clean_passes'} "
            "(built by the first run on these tokens; --no-kl-cache runs it at every step)."
            if setup.kl_cache
            else "KL phase's clean pass: run at every step (--no-kl-cache)."
        ),
        *_interval_notes(extra.get("intervals")),
        *(
            [
                f"Held-out evaluation: {setup.evaluator.n_sequences} sequences of {context_size} tokens "
                f"spread evenly over {setup.eval_data}, never trained on."
            ]
            if setup.evaluator is not None
            else []
        ),
        SINK_NOTE.format(n=sinks),
        f"torch threads: {torch.get_num_threads()}.",
    ]
    written = write_report(
        out, "sae_lens_kl demo: KL+MSE phase after MSE training", runs, history, notes, extra
    )
    print((out / "report.md").read_text())
    print("wrote", ", ".join(str(p) for p in written), "and experiment.json/.md/.png")


def _interval_notes(intervals: dict[str, Any] | None) -> list[str]:
    """The paired intervals as report notes."""
    if intervals is None:
        return []
    level = f"{intervals['level']:.0%}"
    notes = [
        f"Intervals: {level} paired bootstrap over the {intervals['n_sequences']} held-out sequences "
        f"({intervals['n_resamples']} resamples, the same draws for every run)."
    ]
    for name, interval in intervals["fraction_ce_gap_closed"].items():
        if interval is not None:
            notes.append(f"{name}: CE gap closed, {level} interval {format_interval(interval)}.")
    for name, interval in intervals.get("difference_from_control", {}).items():
        if interval is not None:
            notes.append(
                f"{name} − {intervals['control']}: difference in CE gap closed, {level} interval "
                f"{format_interval(interval)}."
            )
    return notes


def experiment(args: argparse.Namespace) -> None:
    from sae_lens_kl.experiments import run_experiment, tokens_needed

    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds} must be at least 1.")
    from sae_lens_kl.experiments import EXPERIMENTS

    if args.normalize_activations != "none" and any(a.one_optimizer for a in EXPERIMENTS[args.name].arms):
        raise SystemExit(
            f"Experiment {args.name} carries the MSE phase's Adam into the KL phase (the paper's A.1), "
            "whose moments are for the normalised weights SAELens rescales at the end; drop "
            "--normalize-activations for it."
        )

    out = check_out(args.out or f"sae_lens_kl_experiment_{args.name}", args.overwrite)
    assert out is not None
    setup = demo_setup(args, quick=args.quick)

    def mse_sae_for(architecture: str, tokens: int | None = None, seed: int = 0) -> TrainingSAE[Any]:
        runner_cfg = setup.runner_config_for(architecture, tokens, seed)
        print(
            f"MSE phase: {architecture}, {runner_cfg.training_tokens:,} tokens (cached after the first run)"
        )
        return cached_mse_sae(runner_cfg, setup.model, setup.train_data, setup.recipe.b_dec_init)[0]

    setup.check_fits(tokens_needed(setup, args.seeds))
    setup.kl_cache = not args.no_kl_cache
    run_experiment(args.name, setup, mse_sae_for, out, overwrite=args.overwrite, seeds=args.seeds)
    print((out / "experiment.md").read_text())
    print(f"wrote {out / 'experiment.json'}, {out / 'experiment.md'}, {out / 'experiment.png'}")


def sweep(args: argparse.Namespace) -> None:
    from sae_lens_kl.sweep import run_sweep

    if any(lr <= 0 for lr in args.lrs) or any(n < 1 for n in args.steps):
        raise SystemExit(f"--lrs {args.lrs} must be > 0 and --steps {args.steps} >= 1.")
    out = check_out(args.out, args.overwrite)
    assert out is not None
    setup = demo_setup(args, quick=args.quick)
    batch_tokens = setup.options["batch_size"] * setup.runner_cfg.context_size
    setup.check_fits(max(args.steps) * batch_tokens)
    mse_sae, cached = demo_start(setup, args)
    print(
        f"MSE phase {'read from cache' if cached else 'trained and cached'}; "
        f"sweeping lrs {args.lrs} x steps {args.steps}"
    )
    run_sweep(setup, mse_sae, args.lrs, args.steps, out, overwrite=args.overwrite)
    print((out / "sweep.md").read_text())


def sparsity(args: argparse.Namespace) -> None:
    from sae_lens_kl.sparsity import kl_phase_tokens, run_sparsity_sweep

    if any(k < 1 for k in args.ks) or not 0 < args.kl_share < 1:
        raise SystemExit(f"--ks {args.ks} must be >= 1 and --kl-share {args.kl_share} in (0, 1).")
    out = check_out(args.out, args.overwrite)
    assert out is not None
    setup = demo_setup(args, quick=args.quick)
    if max(args.ks) > setup.runner_cfg.sae.d_sae:
        raise SystemExit(f"--ks {args.ks}: each k must be at most d_sae {setup.runner_cfg.sae.d_sae}.")
    setup.check_fits(kl_phase_tokens(setup, args.kl_share))

    def mse_sae_for_k(k: int) -> tuple[TrainingSAE[Any], float | None]:
        started = time.perf_counter()
        runner_cfg = setup.runner_config_for("topk", k=k)
        sae, cached = cached_mse_sae(runner_cfg, setup.model, setup.train_data, setup.recipe.b_dec_init)
        return sae, None if cached else time.perf_counter() - started

    run_sparsity_sweep(
        setup,
        args.ks,
        out,
        overwrite=args.overwrite,
        kl_share=args.kl_share,
        end_to_end=args.end_to_end,
        mse_sae_for_k=mse_sae_for_k,
    )
    print((out / "sparsity.md").read_text())
