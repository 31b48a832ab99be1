"""`sae-lens-kl`: every subcommand's options are small dataclasses below (and the fine-tune's
`KLFinetuneConfig`); flags and --help text are generated from their fields and docstrings
(`flags.py`), and any option can also come from a YAML/JSON file (--config).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sae_lens_kl.config import (
    LOSS_MODES,
    KLFinetuneConfig,
)
from sae_lens_kl.flags import add_flags, config_value, read_config_file
from sae_lens_kl.options import (
    CacheOptions,
    CircuitsOptions,
    Common,
    DemoControls,
    DemoKLSource,
    DemoModel,
    DemoOptimizer,
    DemoRun,
    EvalOptions,
    ExperimentOptions,
    ExportOptions,
    FinetuneOptions,
    Output,
    SAEBenchOptions,
    SparsityOptions,
    SweepOptions,
    TrainOptions,
)
from sae_lens_kl.recipes import (
    DEMO_MSE_RECIPE,
    DEMO_SIZES,
    QUICK_SIZES,
)

# This module only parses: torch, SAELens and TransformerLens load when a command runs.


def add_config_flags(
    parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), helps: dict[str, str] | None = None
) -> None:
    """One flag per KLFinetuneConfig field (except `exclude`), with its docstring and default as
    help (or `helps`' text, where a command gives the field another meaning)."""
    group = parser.add_argument_group("fine-tune options (KLFinetuneConfig)")
    add_flags(group, KLFinetuneConfig, exclude=exclude, helps=helps, negatable=True)


def config_from_args(args: argparse.Namespace) -> KLFinetuneConfig:
    """The KLFinetuneConfig of parsed flags (validated: a bad value raises ValueError)."""
    return KLFinetuneConfig(**KLFinetuneConfig.options_in(args))


OptionGroup = tuple[str | None, type, dict[str, Any] | None, dict[str, str] | None]


def _command(
    sub: Any,
    name: str,
    help_text: str,
    description: str,
    *groups: type | OptionGroup,
    out: str | None,
    out_help: str,
) -> argparse.ArgumentParser:
    """A subcommand with the common options, an output folder (`out`: its default) and the option
    groups given as dataclasses or (title, dataclass, defaults, helps)."""
    parser = sub.add_parser(name, help=help_text, description=description)
    add_flags(parser, Common)
    for group in groups:
        title, cls, defaults, helps = group if isinstance(group, tuple) else (None, group, None, None)
        add_flags(parser.add_argument_group(title) if title else parser, cls, defaults=defaults, helps=helps)
    add_flags(parser, Output, defaults={"out": out}, helps={"out": out_help})
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-kl",
        description="KL+MSE fine-tuning of SAELens SAEs (Karvonen 2025). Each subcommand has --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sizes = {
        "kl_steps": f"KL-phase steps of --kl-batch sequences (default: {DEMO_SIZES['kl_steps']}).",
        "mse_tokens": f"MSE-phase training tokens (default: {DEMO_SIZES['mse_tokens']:,}).",
        "eval_tokens": f"Held-out evaluation tokens (default: {DEMO_SIZES['eval_tokens']:,}).",
        "d_sae": f"TopK SAE latents (default: {DEMO_SIZES['d_sae']}).",
    }
    run: OptionGroup = (None, DemoRun, None, sizes)
    model: OptionGroup = ("model, data and SAE (defaults: the offline demo)", DemoModel, None, sizes)
    quick = (
        f"A minutes-long size (MSE phase {QUICK_SIZES['mse_tokens']:,} tokens, {QUICK_SIZES['kl_steps']} "
        f"KL steps, {QUICK_SIZES['eval_tokens']:,} held-out tokens, d_sae {QUICK_SIZES['d_sae']}) "
        "instead of the demo's."
    )
    controls = (
        "Comma-separated objectives also run on the KL phase's tokens from the same MSE-phase SAE, for "
        f"comparison (any of {', '.join(LOSS_MODES)}; default: mse, the MSE-only control; 'mse,kl' adds "
        "the paper's KL-only comparison)."
    )

    def output(default: str) -> str:
        return f"Output folder (default: {default})."

    _command(
        sub,
        "demo",
        "Offline end-to-end demo on SmolLM2-135M and Django's docs (wall times: docs/demo.md).",
        "Trains a TopK SAE with SAELens's runner (MSE phase, cached after the first run), then runs the "
        "KL+MSE phase and an MSE-only control of the same length, evaluates all on held-out text, and "
        "writes report.json, report.md and PNG plots. Needs no hub access.",
        run,
        DemoOptimizer,
        model,
        (None, DemoControls, None, {"controls": controls}),
        DemoKLSource,
        out="sae_lens_kl_demo",
        out_help=output("sae_lens_kl_demo"),
    )
    _command(
        sub,
        "experiment",
        "One of the paper's comparisons (A-F) on the demo's model, SAE and tokens.",
        "Runs every arm of an experiment (A: KL+MSE vs MSE-only vs KL-only; B: adapters; C: LoRA on the "
        "SAE; D: LoRA on the LM; E: weight stability TopK vs ReLU; F: end to end vs a 5 % KL phase vs "
        "e2e+ds) from the demo's MSE-phase SAE and writes experiment.json/.md/.png.",
        (None, ExperimentOptions, None, {"quick": quick}),
        run,
        model,
        DemoKLSource,
        out=None,
        out_help=output("sae_lens_kl_experiment_<name>"),
    )
    _command(
        sub,
        "sweep",
        "The KL phase's lr x steps sweep: KL+MSE vs its MSE-only control per cell, with intervals.",
        "From the demo's MSE-phase SAE (its size flags apply), runs KL+MSE and the MSE-only control at "
        "every lr and step count on the same tokens, evaluates both on the same held-out sequences and "
        "writes sweep.json/.md/.png with paired 95 % intervals.",
        SweepOptions,
        run,
        DemoOptimizer,
        model,
        out="sae_lens_kl_sweep",
        out_help=output("sae_lens_kl_sweep"),
    )
    _command(
        sub,
        "sparsity",
        "The paper's Fig. 2 in miniature: a short KL+MSE phase vs MSE-only (vs end to end) per TopK k.",
        "For each k: the demo's MSE phase (cached), then KL+MSE and the MSE-only control on the next "
        "--kl-share of the run's tokens (and, with --end-to-end, KL+MSE from SAELens's initialisation "
        "on all the tokens), all evaluated on the same held-out sequences; writes "
        "sparsity.json/.md/.png with paired 95 % intervals and wall-clock.",
        SparsityOptions,
        run,
        model,
        out="sae_lens_kl_sparsity",
        out_help=output("sae_lens_kl_sparsity"),
    )
    finetune = _command(
        sub,
        "finetune",
        "Fine-tune a pretrained or local SAE.",
        "Fine-tune an SAE (SAELens release:sae_id, or a local SAELens folder) on a model.",
        FinetuneOptions,
        out=None,
        out_help="Output folder: SAELens SAE, checkpoints, report.",
    )
    add_config_flags(finetune)
    train = _command(
        sub,
        "train",
        "SAELens training run whose last --kl-fraction of tokens is the KL+MSE phase.",
        "Runs SAELens's LanguageModelSAETrainingRunner (MSE on shuffled activations) for "
        "(1 - kl_fraction) of --training-tokens, then the KL+MSE phase on the tokens after every "
        "sequence the MSE phase read. "
        "--kl-fraction 1 trains end to end.",
        TrainOptions,
        out=None,
        out_help="Output folder.",
    )
    # The budget of both phases is --training-tokens; --kl-fraction says how much is KL;
    # --continue-optimizer names the MSE phase's optimizer state itself.
    add_config_flags(
        train,
        exclude=("tokens", "continue_optimizer_from"),
        helps={
            "context_size": f"Tokens per sequence, both phases (default: {DEMO_MSE_RECIPE.context_size})."
        },
    )
    _command(
        sub,
        "cache",
        "Run the model once over a token budget and store the clean pass for later fine-tunes.",
        "Stores, per token, the residual entering the hook's block, the hook activation and the clean "
        "next-token distribution (as W_U p, b_U.p and sum p log p for a float32 linear unembedding, "
        "else the unembedding input), so that `finetune --data <this folder>` skips the clean forward "
        "pass (exact, not an approximation). Prints the size before writing.",
        CacheOptions,
        out=None,
        out_help="Cache folder.",
    )
    _command(
        sub,
        "eval",
        "Evaluate one or more SAEs side by side on held-out text.",
        "Spliced CE/KL, L0, MSE, explained variance, dead latents.",
        EvalOptions,
        out=None,
        out_help="Folder for report.json/report.md (default: print only).",
    )
    _command(
        sub,
        "saebench",
        "SAEBench's evals on SAEs side by side (before/after a fine-tune).",
        "Runs SAEBench's own evals (core, absorption, meta_structure; sae-bench 0.6.0, the [saebench] "
        "extra) on every --sae and writes saebench.json, saebench.md (one column per SAE and the "
        "difference from the first), saebench.png and SAEBench's result files.",
        SAEBenchOptions,
        out="saebench",
        out_help=output("saebench"),
    )
    _command(
        sub,
        "circuits",
        "Attribution with the error node for SAEs side by side (e.g. before and after a fine-tune).",
        "Scores every latent and the error node by attribution patching (Marks et al. 2024) on an "
        "induction task built from held-out text, and the faithfulness of the top-N latents; writes "
        "circuits.json/.md/.png.",
        CircuitsOptions,
        out=None,
        out_help="Output folder (default: print only).",
    )
    _command(
        sub,
        "export",
        "Export a transcoder set for circuit-tracer (attribution graphs with the replacement model).",
        "Writes the transcoders (one per layer from 0) in circuit-tracer 0.5.0's local format: "
        "config.yaml and layer_{i}.safetensors, all at once; circuit-tracer's "
        "load_transcoder_from_hub(<absolute folder>) reads it offline.",
        ExportOptions,
        out=None,
        out_help="Output folder.",
    )
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        values = read_config_file(parser, args.config)
        sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        known = {action.dest for action in sub._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {args.config}: unknown options {unknown}")
        actions = {action.dest: action for action in sub._actions}
        try:
            typed = {name: config_value(actions[name], value) for name, value in values.items()}
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            parser.error(f"--config {args.config}: {error}")
        sub.set_defaults(**typed)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args: argparse.Namespace | None = None
    # SIGTERM (a scheduler's kill) ends the run like Ctrl-C: with what was kept, not a traceback.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = parse(argv)
        _run(args)
    except KeyboardInterrupt:
        return _interrupted(args)
    except Exception as error:
        # SAELens's runner turns signals into its own InterruptedException (sae-lens 6.54)
        if type(error).__name__ == "InterruptedException":
            return _interrupted(args)
        if isinstance(error, (ValueError, OSError)):  # bad input: one line, no traceback
            return _error(args, str(error))
        raise
    except SystemExit as stop:
        if isinstance(stop.code, str):
            return _error(args, stop.code)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from sae_lens_kl import commands

    handler = {
        "demo": commands.demo,
        "finetune": commands.finetune,
        "train": commands.train,
        "cache": commands.cache,
        "eval": commands.evaluate,
        "experiment": commands.experiment,
        "sweep": commands.sweep,
        "sparsity": commands.sparsity,
        "circuits": commands.circuits,
        "saebench": commands.saebench,
        "export": commands.export,
    }[args.command]
    handler(args)


def _error(args: argparse.Namespace | None, message: str) -> int:
    command = f"sae-lens-kl {args.command}" if args is not None else "sae-lens-kl"
    print(f"{command}: error: {' '.join(message.split())}", file=sys.stderr)  # one line
    return 2


def _interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001 (signal handler signature)
    raise KeyboardInterrupt


def _interrupted(args: argparse.Namespace | None) -> int:
    """Say what the interrupted run kept; a second Ctrl-C meanwhile is ignored, not a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if args is None:
            print("sae-lens-kl: interrupted while starting; nothing was written.", file=sys.stderr)
            return 130
        out = getattr(args, "out", None)
        where = "Nothing was saved from the unfinished run."
        if out and args.command == "finetune":
            where = _finetune_kept(Path(out))
        print(f"sae-lens-kl {args.command}: interrupted. {where}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _finetune_kept(out: Path) -> str:
    """What an interrupted fine-tune into `out` can be resumed from, as it is on disk now."""
    from sae_lens_kl.checkpoints import CHECKPOINTS_DIRNAME, FINETUNE_STATE_FILENAME

    checkpoints = sorted((out / CHECKPOINTS_DIRNAME).glob(f"[!.]*/{FINETUNE_STATE_FILENAME}"))
    if checkpoints:
        return (
            f"Checkpoints written so far are under {out / CHECKPOINTS_DIRNAME}; run the same command "
            f"with --resume {out} to continue."
        )
    kept = " The SAE already in that folder is unchanged." if (out / "cfg.json").is_file() else ""
    return (
        f"No checkpoint was written, so the run cannot be resumed (pass --checkpoint-every-tokens N "
        f"to make a long run resumable).{kept}"
    )


def entry() -> None:
    """The `sae-lens-kl` command: main's exit code; after an interrupt, a further Ctrl-C while the
    interpreter shuts down (seconds with torch loaded) is ignored rather than a second exit."""
    code = main()
    if code == 130:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
