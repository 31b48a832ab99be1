"""What the `sae-lens-kl` subcommands do, given parsed arguments (parsing lives in cli.py, which
imports this module only to run a command)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, TrainingSAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from sae_lens_kl.api import kl_finetune
from sae_lens_kl.checkpoints import CHECKPOINTS_DIRNAME, FINETUNE_STATE_FILENAME
from sae_lens_kl.config import KL_CHUNK_TOKENS, LOSS_MODES, KLFinetuneConfig
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.data import token_sequences
from sae_lens_kl.evaluation import HeldOutEvaluator
from sae_lens_kl.evaluation import evaluate as evaluate_sae
from sae_lens_kl.intervals import format_interval, paired_intervals
from sae_lens_kl.models import cache_root, load_model
from sae_lens_kl.parallel import init_process_group, launched_processes
from sae_lens_kl.recipes import DEMO_MSE_RECIPE, DEMO_SIZES, KL_BATCH_SEQUENCES, QUICK_SIZES, MSERecipe
from sae_lens_kl.report import METRICS_FILENAME, History, write_report
from sae_lens_kl.save_dir import exclusive, holds_nothing
from sae_lens_kl.staging import staged_folder, write_file
from sae_lens_kl.train import mse_phase, runner_config, train_with_kl_phase

SINK_NOTE = (
    "Positions excluded from SAE training, splicing and every metric: special tokens (BOS/EOS/PAD, "
    "as SAELens excludes them) and the first {n} positions of each sequence, whose residual norms are "
    "~100x the rest in SmolLM2 (an attention sink)."
)


def load_sae(spec: str, device: str = "cpu") -> SAE[Any]:
    """An SAE from a local SAELens folder or RELEASE:SAE_ID (the hub); an unknown release or id
    is an error listing close matches."""
    if Path(spec).expanduser().is_dir():
        try:
            return SAE.load_from_disk(Path(spec).expanduser(), device=device)
        except Exception as error:  # noqa: BLE001 (any failure to read the folder is the folder's)
            raise SystemExit(
                f"--sae {spec}: cannot load the SAE folder ({type(error).__name__}: {str(error)[:200]}); "
                "pass a folder saved by SAELens (cfg.json with a known architecture and matching "
                "sae_weights.safetensors)."
            ) from error
    if spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists():
        raise SystemExit(f"--sae {spec}: no SAE folder there (a folder with cfg.json and the weights).")
    if ":" not in spec:
        raise SystemExit(f"--sae {spec!r} is neither a local SAE folder nor RELEASE:SAE_ID.")
    release, sae_id = spec.split(":", 1)
    directory = get_pretrained_saes_directory()
    if release not in directory and "/" not in release:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.4)
        raise SystemExit(f"Unknown SAELens release {release!r}. Close matches: {close}.")
    if release in directory and sae_id not in directory[release].saes_map:
        close = difflib.get_close_matches(sae_id, list(directory[release].saes_map), n=5, cutoff=0.4)
        raise SystemExit(f"Unknown sae_id {sae_id!r} in release {release!r}. Close matches: {close}.")
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as error:  # noqa: BLE001 (offline, a damaged cache: the user's to fix)
        raise SystemExit(
            f"--sae {spec}: cannot load it ({type(error).__name__}: {str(error)[:200]}). Offline, "
            "it must be in the Hugging Face cache (HF_HUB_OFFLINE=1), or pass a local SAE folder."
        ) from error


CONTROL_NAMES = {"mse": "MSE-only control", "kl": "KL-only", "e2e+ds": "e2e+ds"}
CONTROL_FOLDERS = {"mse": "mse_control"}


def _check_out(out: str | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SystemExit(f"--out {path} is a file; pass a folder.")
    if not holds_nothing(path) and not overwrite:
        raise SystemExit(f"Output folder {path} exists and is not empty; pass --overwrite or another --out.")
    return path


def _report_of_another_command(out: Path, own_title: str) -> str | None:
    """What in `out` another command wrote that a report there would replace, or None: a
    fine-tune's artifact, or a report whose title is not `own_title`."""
    if (out / METRICS_FILENAME).is_file() or (out / "cfg.json").is_file():
        return "a fine-tuned SAE and its report"
    report = out / "report.md"
    if report.is_file() and not (title := report.read_text()).startswith(own_title):
        return f"another command's report ({title.splitlines()[0] if title else 'empty'})"
    if (out / "report.json").is_file() and not report.is_file():
        return "another command's report.json"
    return None


def mse_cache_folder(runner_cfg: LanguageModelSAERunnerConfig[Any]) -> Path:
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
    key = hashlib.sha1(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "mse_saes" / key


def cached_mse_sae(
    runner_cfg: LanguageModelSAERunnerConfig[Any], model: Any, data: Any
) -> tuple[TrainingSAE[Any], bool]:
    """The MSE-phase SAE for this configuration, trained once and then read from the cache."""
    folder = mse_cache_folder(runner_cfg)
    if (folder / "cfg.json").is_file():
        return TrainingSAE.load_from_disk(folder, device=str(model.cfg.device)), True
    sae = mse_phase(runner_cfg, model, data, runner_cfg.training_tokens)
    with staged_folder(folder) as staging:
        sae.save_model(staging)
    return sae, False


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

    @property
    def sinks(self) -> int:
        return self.recipe.sink_positions

    def held_out(self) -> dict[str, Any]:
        """The keyword that gives a fine-tune its held-out evaluation: the shared evaluator."""
        return {"evaluator": self.evaluator} if self.evaluator is not None else {"eval_data": self.eval_data}

    def runner_config_for(
        self, architecture: str, tokens: int | None = None, seed: int = 0, k: float | None = None
    ) -> LanguageModelSAERunnerConfig[Any]:
        """The MSE phase's config for another architecture (same width, data, lr), length, seed
        (added to the demo's runner seed) or TopK k."""
        recipe = self.recipe
        if (architecture, tokens, seed, k) == (recipe.architecture, None, 0, None):
            return self.runner_cfg
        recipe = dataclasses.replace(
            recipe,
            architecture=architecture,
            tokens=tokens or recipe.tokens,
            seed=recipe.seed + seed,
            k=recipe.k if k is None else k,
        )
        return recipe.runner_config(self.model, self.runner_cfg.hook_name, self.runner_cfg.dataset_path)

    def check_fits(self, tokens: int) -> None:
        """Refuse, before any training, a run that reads more training tokens than the data holds
        (as whole sequences of the run's context)."""
        context = self.runner_cfg.context_size
        needed = -(-tokens // context)
        stream = token_sequences(self.train_data, self.model, context, self.runner_cfg.prepend_bos)
        if next(itertools.islice(stream, needed - 1, None), None) is None:
            raise SystemExit(
                f"The training data ({self.train_data}) holds fewer than the {needed:,} sequences of "
                f"{context} tokens ({tokens:,} tokens) this run reads; pass more --data, or fewer "
                "--mse-tokens, --kl-steps, --steps or --seeds."
            )


def demo_setup(args: argparse.Namespace, quick: bool = False) -> DemoSetup:
    """The demo's setup; sizes not given on the command line take the demo's (or quick) values."""
    for name, value in (QUICK_SIZES if quick else DEMO_SIZES).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    model = load_model(args.model)
    train_data, eval_data = _text_or_corpus(args.data, args.eval_data)
    recipe = dataclasses.replace(
        DEMO_MSE_RECIPE, d_sae=args.d_sae, k=args.k, tokens=args.mse_tokens, context_size=args.context_size
    )
    context_size, batch_size, sinks = recipe.context_size, KL_BATCH_SEQUENCES, recipe.sink_positions
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
    evaluator = (
        HeldOutEvaluator.for_data(
            model,
            eval_data,
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
    return DemoSetup(model, train_data, eval_data, recipe, runner_cfg, kl_tokens, options, evaluator)


def demo(args: argparse.Namespace) -> None:
    unknown = [loss for loss in args.controls if loss not in LOSS_MODES]
    if unknown:
        raise SystemExit(f"--controls {','.join(unknown)}: not a loss; choose from {', '.join(LOSS_MODES)}.")
    out = _check_out(args.out, args.overwrite)
    assert out is not None
    setup = demo_setup(args)
    setup.check_fits(setup.runner_cfg.training_tokens + setup.kl_tokens)
    model, train_data, eval_data, runner_cfg = (
        setup.model,
        setup.train_data,
        setup.eval_data,
        setup.runner_cfg,
    )
    hook, sinks, options, kl_tokens = args.hook, setup.sinks, setup.options, setup.kl_tokens
    batch_size, context_size = options["batch_size"], args.context_size
    print(
        f"MSE phase: SAELens runner, TopK k={args.k}, d_sae={args.d_sae} at {hook}, "
        f"{args.mse_tokens:,} tokens"
    )
    mse_sae, cached = cached_mse_sae(runner_cfg, model, train_data)
    print("  (read from cache)" if cached else "  (trained and cached)")
    total = args.mse_tokens + kl_tokens
    history = History()
    print(f"KL+MSE phase: {args.kl_steps} steps of {batch_size}x{context_size} tokens, lr {args.lr}")
    result = train_with_kl_phase(
        dataclasses.replace(runner_cfg, training_tokens=total),
        model,
        train_data,
        kl_fraction=kl_tokens / total,
        save_dir=out / "kl_mse",
        mse_sae=mse_sae,
        callbacks=[history],
        overwrite=args.overwrite,
        start_sae=mse_cache_folder(runner_cfg),
        **setup.held_out(),
        **options,
    )
    runs = {"KL+MSE": result.sae.cfg.metadata.kl_finetune}
    # Controls on the same tokens from the same MSE-phase SAE: MSE-only continuation (paper App. B),
    # and any other objective asked for (KL-only, Braun et al.'s e2e+ds, ...).
    controls: dict[str, SAE[Any]] = {}
    for loss in [] if args.no_control else args.controls:
        print(f"control: loss={loss} on the same tokens")
        control = kl_finetune(
            mse_sae,
            model,
            result.kl_data,
            tokens=result.kl_tokens,
            loss=loss,
            save_dir=out / CONTROL_FOLDERS.get(loss, loss.replace("+", "_")),
            overwrite=args.overwrite,
            start_sae=mse_cache_folder(runner_cfg),
            **setup.held_out(),
            **options,
        )
        runs[CONTROL_NAMES.get(loss, loss)] = control.cfg.metadata.kl_finetune
        controls[CONTROL_NAMES.get(loss, loss)] = control
    evaluator = setup.evaluator
    extra: dict[str, Any] = {"mse_phase_cached": cached, "kl_tokens_share_of_run": kl_tokens / total}
    control_name = CONTROL_NAMES["mse"]
    if evaluator is not None:
        # every run was evaluated on the same held-out sequences: paired intervals (stored results)
        tuned = {"KL+MSE": result.sae, **controls}
        extra["intervals"] = paired_intervals(
            evaluator(mse_sae),
            {name: evaluator(sae) for name, sae in tuned.items()},
            control=control_name if control_name in tuned else None,
        )
    notes = [
        f"Model: {model.cfg.model_name}; SAE: TopK k={args.k}, d_sae={args.d_sae} at {hook}, MSE-trained "
        f"with SAELens's runner on {args.mse_tokens:,} tokens of {train_data}.",
        f"KL phase: {kl_tokens:,} tokens = {kl_tokens / total:.1%} of the run's {total:,}.",
        *_interval_notes(extra.get("intervals")),
        f"Held-out evaluation: {args.eval_tokens:,} tokens of {eval_data}, never trained on.",
        SINK_NOTE.format(n=sinks),
        f"torch threads: {torch.get_num_threads()}.",
    ]
    written = write_report(
        out,
        "sae_lens_kl demo: KL+MSE phase after MSE training",
        runs,
        history,
        notes,
        extra,
    )
    print((out / "report.md").read_text())
    print("wrote", ", ".join(str(p) for p in written))


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

    out = _check_out(args.out or f"sae_lens_kl_experiment_{args.name}", args.overwrite)
    assert out is not None
    setup = demo_setup(args, quick=args.quick)

    def mse_sae_for(architecture: str, tokens: int | None = None, seed: int = 0) -> TrainingSAE[Any]:
        runner_cfg = setup.runner_config_for(architecture, tokens, seed)
        print(
            f"MSE phase: {architecture}, {runner_cfg.training_tokens:,} tokens (cached after the first run)"
        )
        return cached_mse_sae(runner_cfg, setup.model, setup.train_data)[0]

    setup.check_fits(tokens_needed(setup, args.seeds))
    run_experiment(args.name, setup, mse_sae_for, out, overwrite=args.overwrite, seeds=args.seeds)
    print((out / "experiment.md").read_text())
    print(f"wrote {out / 'experiment.json'}, {out / 'experiment.md'}, {out / 'experiment.png'}")


def sweep(args: argparse.Namespace) -> None:
    from sae_lens_kl.sweep import run_sweep

    if any(lr <= 0 for lr in args.lrs) or any(n < 1 for n in args.steps):
        raise SystemExit(f"--lrs {args.lrs} must be > 0 and --steps {args.steps} >= 1.")
    out = _check_out(args.out, args.overwrite)
    assert out is not None
    setup = demo_setup(args, quick=args.quick)
    batch_tokens = setup.options["batch_size"] * setup.runner_cfg.context_size
    setup.check_fits(setup.runner_cfg.training_tokens + max(args.steps) * batch_tokens)
    mse_sae, cached = cached_mse_sae(setup.runner_cfg, setup.model, setup.train_data)
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
    out = _check_out(args.out, args.overwrite)
    assert out is not None
    setup = demo_setup(args, quick=args.quick)
    if max(args.ks) > setup.runner_cfg.sae.d_sae:
        raise SystemExit(f"--ks {args.ks}: each k must be at most d_sae {setup.runner_cfg.sae.d_sae}.")
    setup.check_fits(setup.runner_cfg.training_tokens + kl_phase_tokens(setup, args.kl_share))

    def mse_sae_for_k(k: int) -> tuple[TrainingSAE[Any], float | None]:
        started = time.perf_counter()
        sae, cached = cached_mse_sae(setup.runner_config_for("topk", k=k), setup.model, setup.train_data)
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


def _text_or_corpus(data: str | None, eval_data: str | None) -> tuple[Any, Any]:
    """(training, held-out) text: the given ones, the Django docs corpus for those not given."""
    if data is not None and eval_data is not None:
        return data, eval_data
    corpus = django_docs()
    return data or corpus.train, eval_data or corpus.eval


def finetune(args: argparse.Namespace) -> None:
    if not args.sae:
        raise SystemExit("finetune needs --sae RELEASE:SAE_ID or a local SAE folder.")
    if args.tokens is None:
        raise SystemExit("finetune needs --tokens (the training token budget).")
    if args.resume is not None and args.out is None:  # continue in the folder of the run resumed
        args.out = str(_run_folder(Path(args.resume).expanduser()))
    out = _check_out(args.out, args.overwrite or args.resume is not None)
    options = KLFinetuneConfig.options_in(args)
    KLFinetuneConfig(**options)  # validate every option before loading anything
    processes = launched_processes()
    if processes > 1 and not args.distributed:
        raise SystemExit(
            f"finetune was launched as {processes} processes (torchrun) without --distributed: each "
            "would run the whole fine-tune into the same folder. Pass --distributed, or run one process."
        )
    device = args.device or "cpu"
    if args.distributed:  # this rank's device: cuda:LOCAL_RANK on GPU
        device = options["device"] = init_process_group(args.device)
    sae = load_sae(args.sae, device=device)
    model = load_model(args.model or sae.cfg.metadata.model_name, device=device)
    history = History()
    tuned = kl_finetune(  # holds the writer lock of `out` while it runs
        sae,
        model,
        args.data,
        save_dir=out,
        resume_from=args.resume,
        overwrite=args.overwrite,
        eval_data=args.eval_data,
        callbacks=[history],
        start_sae=args.sae,
        **options,
    )
    report = tuned.cfg.metadata.kl_finetune
    if args.distributed:
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:  # rank 0 writes the report and prints
            return
    if out is not None:
        with exclusive(out):
            title = f"sae_lens_kl finetune: {args.sae}"
            write_report(out, title, {report["config"]["loss"]: report}, history, [])
        print((out / "report.md").read_text())
    else:
        print(json.dumps({k: report[k] for k in ("before", "after", "fraction_ce_gap_closed")}, indent=2))


def _run_folder(resume: Path) -> Path:
    """The run folder of `--resume`: the folder itself, or for a checkpoint folder
    (RUN/checkpoints/N) its run's."""
    if (resume / FINETUNE_STATE_FILENAME).is_file() and resume.parent.name == CHECKPOINTS_DIRNAME:
        return resume.parent.parent
    if (resume / FINETUNE_STATE_FILENAME).is_file():
        raise SystemExit(f"--resume {resume} is a checkpoint outside a run folder; pass --out too.")
    return resume


def train(args: argparse.Namespace) -> None:
    out = _check_out(args.out, args.overwrite)
    options = KLFinetuneConfig.options_in(args, drop=("context_size",))
    if args.continue_optimizer:  # one Adam and one constant lr for both phases
        options.update(lr=args.mse_lr, lr_schedule="constant")
    KLFinetuneConfig(tokens=args.training_tokens, **options)  # validate before loading anything
    model = load_model(args.model, device=args.device or "cpu")
    data, eval_data = _text_or_corpus(args.data, args.eval_data)
    runner_cfg = runner_config(
        model,
        args.hook,
        architecture=args.architecture,
        d_sae=args.d_sae,
        k=args.k,
        tokens=args.training_tokens,
        context_size=args.context_size or DEMO_MSE_RECIPE.context_size,
        lr=args.mse_lr,
        batch_tokens=args.train_batch_size_tokens,
        sink_positions=args.exclude_first_positions,
        dataset_name=str(data),
        seed=args.seed,
    )
    history = History()
    result = train_with_kl_phase(
        runner_cfg,
        model,
        data,
        kl_fraction=args.kl_fraction,
        eval_data=eval_data,
        save_dir=out,
        continue_optimizer=args.continue_optimizer,
        callbacks=[history],
        overwrite=args.overwrite,
        **options,
    )
    report = result.sae.cfg.metadata.kl_finetune
    notes = [
        f"MSE phase: {result.mse_tokens:,} tokens (SAELens runner); "
        f"KL+MSE phase: {result.kl_tokens:,} tokens."
    ]
    if out is not None:
        write_report(
            out, f"sae_lens_kl train: {args.architecture} at {args.hook}", {"KL+MSE": report}, history, notes
        )
        print((out / "report.md").read_text())


def evaluate(args: argparse.Namespace) -> None:
    if not args.sae:
        raise SystemExit("eval needs at least one --sae.")
    out = _check_out(args.out, args.overwrite)
    if out is not None and (other := _report_of_another_command(out, "# sae_lens_kl eval")):
        raise SystemExit(
            f"--out {out} holds {other}; eval would replace it with its own report.json. Pass another --out."
        )
    saes = [load_sae(spec) for spec in args.sae]
    model = load_model(args.model or saes[0].cfg.metadata.model_name)
    data = args.data or django_docs().eval
    rows = {}
    for spec, sae in zip(args.sae, saes, strict=True):
        result = evaluate_sae(
            sae,
            model,
            data,
            n_tokens=args.n_tokens,
            batch_size=args.batch_size,
            context_size=args.context_size,
            exclude_first_positions=args.exclude_first_positions,
        )
        row = result.to_dict()
        downstream = row.pop("downstream_mse")
        rows[spec] = {**row, **{f"downstream_mse[{hook}]": value for hook, value in downstream.items()}}
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in rows[names[0]]:
        lines.append(
            f"| {key} | "
            + " | ".join(
                f"{rows[n][key]:.4f}" if isinstance(rows[n][key], float) else str(rows[n][key]) for n in names
            )
            + " |"
        )
    table = "\n".join(lines)
    print(table)
    if out is not None:
        write_file(out / "report.json", json.dumps(rows, indent=2))
        write_file(out / "report.md", "# sae_lens_kl eval\n\n" + table + "\n")


def circuits(args: argparse.Namespace) -> None:
    from matplotlib.figure import Figure

    from sae_lens_kl.circuits import circuits_markdown, compare_circuits, induction_task
    from sae_lens_kl.data import take, token_sequences
    from sae_lens_kl.report import save_figure

    named: dict[str, list[str]] = {}
    for spec in args.sae or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--sae {spec!r}: write NAME=SAE (e.g. before=./mse_sae).")
        named.setdefault(name, []).append(path)
    if not named:
        raise SystemExit("circuits needs --sae NAME=SAE, e.g. --sae before=A --sae after=B.")
    out = _check_out(args.out, args.overwrite)
    # a name repeated with SAEs at several hooks: one circuit through all of them
    saes = {name: [load_sae(path) for path in paths] for name, paths in named.items()}
    hooks = {name: sorted(sae.cfg.metadata.hook_name for sae in group) for name, group in saes.items()}
    for name, group_hooks in hooks.items():
        if len(set(group_hooks)) != len(group_hooks):
            raise SystemExit(
                f"--sae {name}=...: two of its SAEs read the same hook ({group_hooks}); one per hook."
            )
    if len({tuple(group_hooks) for group_hooks in hooks.values()}) != 1:
        raise SystemExit(f"The names' SAEs read different hooks {hooks}; compare SAEs of the same hooks.")
    model = load_model(args.model or next(iter(saes.values()))[0].cfg.metadata.model_name)
    text = take(
        token_sequences(args.data or django_docs().eval, model, 128, False),
        -(-args.prompts * args.length // 128),
    )
    if text is None:
        raise SystemExit("The text is too short for --prompts x --length tokens.")
    task = induction_task(model, text, args.prompts, args.length)
    print(f"{task.name}: clean top-1 accuracy {task.accuracy:.1%}")
    result = compare_circuits(
        saes, model, task.tokens, task.metric, sizes=args.sizes, method=args.method, steps=args.ig_steps
    )
    scores = (
        "attribution patching" if args.method == "atp" else f"integrated gradients, {args.ig_steps} steps"
    )
    table = circuits_markdown(task, result, scores)
    print(table)
    if out is not None:
        write_file(
            out / "circuits.json",
            json.dumps({"task": task.name, "accuracy": task.accuracy, "scores": scores, **result}, indent=2),
        )
        write_file(out / "circuits.md", table)
        fig = Figure(figsize=(5, 3.4))
        axis = fig.subplots()
        for name, run in result.items():
            curve = run["faithfulness"]
            axis.plot(
                [row["n_latents"] for row in curve],
                [row["faithfulness"] for row in curve],
                marker=".",
                label=name,
            )
        axis.set_xscale("log")
        axis.set_xlabel("latents kept (top by |attribution|), error node kept")
        axis.set_ylabel("faithfulness")
        axis.legend()
        fig.tight_layout()
        save_figure(fig, out / "circuits.png")


def cache(args: argparse.Namespace) -> None:
    if not args.hook or not args.out:
        raise SystemExit("cache needs --hook and --out.")
    from sae_lens_kl.cache import build_cache

    model = load_model(args.model)
    data = args.data or django_docs().train
    built = build_cache(
        model,
        data,
        args.hook,
        args.out,
        tokens=args.tokens,
        context_size=args.context_size,
        prepend_bos=args.prepend_bos,
        overwrite=args.overwrite,
    )
    print(f"cached {built.n_sequences} sequences in {built.path}; fine-tune with --data {built.path}")


def _named_saes(specs: list[str]) -> list[tuple[str, str]]:
    """NAME=SPEC pairs; a lone kl_finetune folder brings its starting SAE (its report's start_sae)."""
    if not specs:
        raise SystemExit(
            "saebench needs at least one --sae NAME=PATH_OR_RELEASE:SAE_ID, e.g. --sae before=out/."
        )
    named = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise SystemExit(f"--sae {spec!r}: write NAME=PATH_OR_RELEASE:SAE_ID, e.g. --sae after={spec}.")
        named.append((name, source))
    if len(set(name for name, _ in named)) != len(named):
        raise SystemExit(f"--sae names must differ: {[name for name, _ in named]}.")
    if len(named) == 1:
        metrics = Path(named[0][1]).expanduser() / METRICS_FILENAME
        start = json.loads(metrics.read_text()).get("start_sae") if metrics.is_file() else None
        if start is None:
            raise SystemExit(
                f"--sae {specs[0]} alone: give a second SAE to compare with (e.g. --sae before=...); "
                "only a folder kl_finetune wrote with its starting SAE recorded brings its own."
            )
        named.insert(0, ("before" if named[0][0] != "before" else "start", start))
    return named


def saebench(args: argparse.Namespace) -> None:
    from sae_lens_kl import saebench as bench

    named = _named_saes(args.sae)
    bench.check_names(dict(named))
    evals = bench.check_evals([name.strip() for name in args.evals.split(",") if name.strip()])
    out = _check_out(args.out, args.overwrite)
    assert out is not None
    try:
        configs = json.loads(args.eval_config) if args.eval_config else {}
    except json.JSONDecodeError as error:
        raise SystemExit(
            f'--eval-config is not JSON ({error}): e.g. \'{{"core": {{"context_size": 256}}}}\'.'
        ) from None
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise SystemExit(
            '--eval-config maps eval names to settings: e.g. \'{"core": {"context_size": 256}}\'.'
        )
    bench.sae_bench_module("sae_bench")  # the extra is installed
    bench.check_configs(evals, configs)
    device = args.device or "cpu"
    saes = {name: load_sae(spec, device=device) for name, spec in named}
    model_name = args.model or next(iter(saes.values())).cfg.metadata.model_name
    needs_model = any(bench.OFFLINE_EVALS[name].needs_model for name in evals)
    if model_name is None and needs_model:
        raise SystemExit("The SAEs' metadata name no model; pass --model.")
    bench.check_saes(saes, model_name)  # before the model loads
    model = load_model(model_name, device=device) if needs_model else None
    data = (args.data or django_docs().eval) if "core" in evals else None
    bench.evaluate_saebench(
        saes,
        model,
        evals,
        out,
        data=data,
        configs=configs,
        absorption_words=args.absorption_words,
        quick=args.quick,
        device=device,
    )
    print((out / "saebench.md").read_text())
    for name, spec in named:
        print(f"{name}: {spec}")
