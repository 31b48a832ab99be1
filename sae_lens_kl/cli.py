"""`sae-lens-kl`: demo, finetune, train and eval from the command line.

Every fine-tune option is a field of `KLFinetuneConfig`; its flag and --help text are generated
from the field and its docstring, and any option can also come from a YAML/JSON file (--config).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from simple_parsing.docstring import get_attribute_docstring

from sae_lens_kl.config import LOSS_MODES, TRAINING_ARCHITECTURES, KLFinetuneConfig
from sae_lens_kl.recipes import DEMO_HOOK, DEMO_KL_LR, DEMO_MSE_RECIPE, DEMO_SIZES, KL_BATCH_SEQUENCES

# This module only parses: torch, SAELens and TransformerLens load when a command runs.


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (simple-parsing reads them from the source)."""
    return {
        f.name: " ".join(get_attribute_docstring(cls, f.name).docstring_below.split()) for f in fields(cls)
    }


def _flag_type(annotation: Any) -> tuple[type, list[str] | None, str | None]:
    """argparse type, choices and nargs of a field annotation: X, X | None, list[X], or a Literal
    of strings."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation)), None
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], None, "+"
    return annotation, None, None


def add_config_flags(
    parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), helps: dict[str, str] | None = None
) -> None:
    """One flag per KLFinetuneConfig field (except `exclude`), with its docstring and default as
    help (or `helps`' text, where a command gives the field another meaning); the type and
    choices come from the field's annotation."""
    docs = field_docs(KLFinetuneConfig)
    hints = typing.get_type_hints(KLFinetuneConfig)
    group = parser.add_argument_group("fine-tune options (KLFinetuneConfig)")
    for field in fields(KLFinetuneConfig):
        if field.name in exclude:
            continue
        kind, choices, nargs = _flag_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        default = None if field.default is MISSING else field.default
        help_text = (helps or {}).get(field.name, f"{docs[field.name]} (default: {default})")
        if kind is bool:
            # --wandb is the short spelling users expect for --log-to-wandb.
            flags = [flag, "--wandb"] if field.name == "log_to_wandb" else [flag]
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=choices, nargs=nargs, default=default, help=help_text)


def config_from_args(args: argparse.Namespace) -> KLFinetuneConfig:
    """The KLFinetuneConfig of parsed flags (validated: a bad value raises ValueError)."""
    return KLFinetuneConfig(**KLFinetuneConfig.options_in(args))


def _read_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Option values from a YAML or JSON file; any problem is a usage error naming the file."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as error:
        parser.error(f"--config {path}: cannot read it ({error.strerror or error}).")
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except ValueError as error:  # json.JSONDecodeError and yaml.YAMLError's parse errors
        parser.error(
            f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} ({error})."
        )
    except Exception as error:  # noqa: BLE001 (yaml.YAMLError is not a ValueError)
        parser.error(f"--config {path}: not valid YAML ({str(error).splitlines()[0]}).")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values.")
    return {key.replace("-", "_"): value for key, value in values.items()}


def _comma_list(kind: type) -> Callable[[str], list[Any]]:
    """An argparse type: comma-separated values of `kind`."""

    def parse_list(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}s"
            ) from None

    return parse_list


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="YAML or JSON file of option values (flags on the command line win)."
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's own: OMP_NUM_THREADS, else all cores). "
        "Oversubscribed threads slow a step many times.",
    )


def _demo_sizes(parser: argparse.ArgumentParser) -> None:
    """The demo's run lengths, model, data and SAE (shared by `demo` and `experiment`)."""
    parser.add_argument(
        "--lr",
        type=float,
        default=DEMO_KL_LR,
        help="KL-phase learning rate (default: %(default)s, chosen with `sae-lens-kl sweep`; the "
        "paper's 5e-5 is for ~12k steps).",
    )
    parser.add_argument(
        "--kl-steps",
        type=int,
        help=f"KL-phase steps of {KL_BATCH_SEQUENCES} sequences (default: {DEMO_SIZES['kl_steps']}).",
    )
    parser.add_argument(
        "--mse-tokens", type=int, help=f"MSE-phase training tokens (default: {DEMO_SIZES['mse_tokens']:,})."
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        help=f"Held-out evaluation tokens (default: {DEMO_SIZES['eval_tokens']:,}).",
    )
    sizes = parser.add_argument_group(
        "model, data and SAE (defaults: the offline demo; smaller for a quick run)"
    )
    sizes.add_argument(
        "--model", default="smollm2", help="Model (default: %(default)s, the offline SmolLM2)."
    )
    sizes.add_argument("--hook", default=DEMO_HOOK, help="Hook point (default: %(default)s).")
    sizes.add_argument("--d-sae", type=int, help=f"TopK SAE latents (default: {DEMO_SIZES['d_sae']}).")
    sizes.add_argument("--k", type=int, default=int(DEMO_MSE_RECIPE.k), help="TopK k (default: %(default)s).")
    sizes.add_argument(
        "--context-size",
        type=int,
        default=DEMO_MSE_RECIPE.context_size,
        help="Tokens per sequence (default: %(default)s).",
    )
    sizes.add_argument("--data", default=None, help="Training text (default: Django's docs, from PyPI).")
    sizes.add_argument("--eval-data", default=None, help="Held-out text (default: Django's held-out files).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-kl",
        description="KL+MSE fine-tuning of SAELens SAEs (Karvonen 2025). Each subcommand has --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="Offline end-to-end demo on SmolLM2-135M and Django's docs (wall times: docs/demo.md).",
        description="Trains a TopK SAE with SAELens's runner (MSE phase, cached after the first run), "
        "then runs the KL+MSE phase and an MSE-only control of the same length, evaluates all on "
        "held-out text, and writes report.json, report.md and PNG plots. Needs no hub access.",
    )
    _common(demo)
    demo.add_argument("--out", default="sae_lens_kl_demo", help="Output folder (default: %(default)s).")
    demo.add_argument("--overwrite", action="store_true", help="Replace an existing output folder's files.")
    _demo_sizes(demo)
    demo.add_argument(
        "--controls",
        type=lambda text: text.split(","),
        default=["mse"],
        help="Comma-separated objectives also run on the KL phase's tokens from the same MSE-phase "
        f"SAE, for comparison (any of {', '.join(LOSS_MODES)}; default: mse, the MSE-only control; "
        "'mse,kl' adds the paper's KL-only comparison).",
    )
    demo.add_argument("--no-control", action="store_true", help="Run no control (only the KL+MSE phase).")

    experiment = sub.add_parser(
        "experiment",
        help="One of the paper's comparisons (A-F) on the demo's model, SAE and tokens.",
        description="Runs every arm of an experiment (A: KL+MSE vs MSE-only vs KL-only; B: adapters; "
        "C: LoRA on the SAE; D: LoRA on the LM; E: weight stability TopK vs ReLU; F: end to end vs "
        "a 5 %% KL phase vs e2e+ds) from the demo's MSE-phase SAE and writes experiment.json/.md/.png.",
    )
    _common(experiment)
    experiment.add_argument("name", choices=list("ABCDEF"), help="Which experiment.")
    experiment.add_argument(
        "--out", default=None, help="Output folder (default: sae_lens_kl_experiment_<name>)."
    )
    experiment.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output folder's files."
    )
    experiment.add_argument(
        "--quick",
        action="store_true",
        help="A minutes-long size (MSE phase 16,384 tokens, 4 KL steps, 2,048 held-out tokens, "
        "d_sae 1152) instead of the demo's.",
    )
    experiment.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="Run every arm this many times: seed s trains on the s-th block of KL-phase tokens with "
        "init_seed s (arms from scratch also seed their MSE phase); tables give the mean and "
        "intervals that draw seeds as well as held-out sequences (default: %(default)s).",
    )
    _demo_sizes(experiment)

    sweep = sub.add_parser(
        "sweep",
        help="The KL phase's lr x steps sweep: KL+MSE vs its MSE-only control per cell, with intervals.",
        description="From the demo's MSE-phase SAE (its size flags apply), runs KL+MSE and the "
        "MSE-only control at every lr and step count on the same tokens, evaluates both on the same "
        "held-out sequences and writes sweep.json/.md/.png with paired 95 %% intervals.",
    )
    _common(sweep)
    sweep.add_argument(
        "--lrs",
        type=_comma_list(float),
        default=[5e-5, 1e-4, 2e-4, 5e-4],
        help="Comma-separated KL-phase lrs.",
    )
    sweep.add_argument(
        "--steps", type=_comma_list(int), default=[24, 48, 96], help="Comma-separated step counts."
    )
    sweep.add_argument("--out", default="sae_lens_kl_sweep", help="Output folder (default: %(default)s).")
    sweep.add_argument("--overwrite", action="store_true", help="Replace an existing output folder's files.")
    sweep.add_argument("--quick", action="store_true", help="The experiments' minutes-long size.")
    _demo_sizes(sweep)

    sparsity = sub.add_parser(
        "sparsity",
        help="The paper's Fig. 2 in miniature: a short KL+MSE phase vs MSE-only (vs end to end) per TopK k.",
        description="For each k: the demo's MSE phase (cached), then KL+MSE and the MSE-only control on "
        "the next --kl-share of the run's tokens (and, with --end-to-end, KL+MSE from SAELens's "
        "initialisation on all the tokens), all evaluated on the same held-out sequences; writes "
        "sparsity.json/.md/.png with paired 95 %% intervals and wall-clock.",
    )
    _common(sparsity)
    sparsity.add_argument(
        "--ks", type=_comma_list(int), default=[8, 16, 32, 64], help="Comma-separated TopK k values."
    )
    sparsity.add_argument(
        "--kl-share",
        type=float,
        default=0.05,
        help="The KL phase's share of the run's tokens (default: %(default)s, the paper's).",
    )
    sparsity.add_argument(
        "--end-to-end",
        action="store_true",
        help="Also train end to end (KL+MSE on all the run's tokens, at the MSE phase's lr and "
        "batches): per k about as long as the KL step on the whole MSE phase's tokens.",
    )
    sparsity.add_argument(
        "--out", default="sae_lens_kl_sparsity", help="Output folder (default: %(default)s)."
    )
    sparsity.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output folder's files."
    )
    sparsity.add_argument("--quick", action="store_true", help="The experiments' minutes-long size.")
    _demo_sizes(sparsity)

    finetune = sub.add_parser(
        "finetune",
        help="Fine-tune a pretrained or local SAE.",
        description="Fine-tune an SAE (SAELens release:sae_id, or a local SAELens folder) on a model.",
    )
    _common(finetune)
    finetune.add_argument(
        "--sae", required=False, help="RELEASE:SAE_ID (needs the hub) or a local SAE folder."
    )
    finetune.add_argument(
        "--model",
        default=None,
        help="TransformerLens model name, local HF folder, .gguf "
        "file, or 'smollm2' (default: the SAE metadata's model_name).",
    )
    finetune.add_argument(
        "--data",
        default=None,
        help="Dataset name, local text file/folder (default: the SAE metadata's dataset_path).",
    )
    finetune.add_argument(
        "--eval-data",
        default=None,
        help="Held-out evaluation data (default: the first --eval-tokens of --data, never trained on).",
    )
    finetune.add_argument("--out", required=False, help="Output folder: SAELens SAE, checkpoints, report.")
    finetune.add_argument(
        "--resume", default=None, help="Continue a killed run from its output folder or a checkpoint."
    )
    finetune.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output folder's files."
    )
    add_config_flags(finetune)

    train = sub.add_parser(
        "train",
        help="SAELens training run whose last --kl-fraction of tokens is the KL+MSE phase.",
        description="Runs SAELens's LanguageModelSAETrainingRunner (MSE on shuffled activations) for "
        "(1 - kl_fraction) of --training-tokens, then the KL+MSE phase on the following tokens. "
        "--kl-fraction 1 trains end to end.",
    )
    _common(train)
    train.add_argument(
        "--model", default="smollm2", help="Model (default: %(default)s, the offline SmolLM2)."
    )
    train.add_argument("--hook", default=DEMO_HOOK, help="Hook point (default: %(default)s).")
    train.add_argument(
        "--architecture",
        default="topk",
        choices=TRAINING_ARCHITECTURES,
        help="SAE architecture (default: %(default)s).",
    )
    train.add_argument("--k", type=float, default=32, help="TopK/BatchTopK k (default: %(default)s).")
    train.add_argument(
        "--d-sae", type=int, default=DEMO_MSE_RECIPE.d_sae, help="Latents (default: %(default)s)."
    )
    train.add_argument(
        "--training-tokens",
        type=int,
        default=200_000,
        help="Total tokens, both phases (default: %(default)s).",
    )
    train.add_argument(
        "--kl-fraction",
        type=float,
        default=0.05,
        help="Share of tokens in the KL+MSE phase (default: %(default)s).",
    )
    train.add_argument(
        "--mse-lr",
        type=float,
        default=DEMO_MSE_RECIPE.lr,
        help="MSE-phase learning rate (default: %(default)s).",
    )
    train.add_argument(
        "--train-batch-size-tokens",
        type=int,
        default=DEMO_MSE_RECIPE.batch_tokens,
        help="MSE-phase batch (default: %(default)s).",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=42,
        help="Seeds the MSE phase: SAE initialisation and activation shuffling (default: %(default)s).",
    )
    train.add_argument("--data", default=None, help="Training text (default: the Django docs corpus).")
    train.add_argument(
        "--eval-data", default=None, help="Held-out text (default: the corpus's held-out files)."
    )
    train.add_argument("--out", required=False, help="Output folder.")
    train.add_argument("--overwrite", action="store_true", help="Replace an existing output folder's files.")
    train.add_argument(
        "--continue-optimizer",
        action="store_true",
        help="The paper's A.1 recipe: the KL phase continues the MSE phase's Adam at --mse-lr, "
        "constant (one optimizer and one lr for both phases; --lr and --lr-schedule do not apply). "
        "Default: a fresh Adam at --lr, decayed to 0.",
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

    cache = sub.add_parser(
        "cache",
        help="Run the model once over a token budget and store the clean pass for later fine-tunes.",
        description="Stores, per token, the residual entering the hook's block, the hook activation and "
        "the clean next-token distribution (as W_U p, b_U.p and sum p log p for a float32 linear "
        "unembedding, else the unembedding input), so that `finetune --data <this folder>` skips the "
        "clean forward pass (exact, not an approximation). Prints the size before writing.",
    )
    _common(cache)
    cache.add_argument("--model", default="smollm2", help="Model (default: %(default)s).")
    cache.add_argument("--hook", required=False, help="Hook point, e.g. blocks.6.hook_resid_pre.")
    cache.add_argument("--data", default=None, help="Text or dataset (default: the Django docs corpus).")
    cache.add_argument("--tokens", type=int, default=100_000, help="Tokens to cache (default: %(default)s).")
    cache.add_argument(
        "--context-size", type=int, default=128, help="Tokens per sequence (default: %(default)s)."
    )
    cache.add_argument(
        "--no-prepend-bos", dest="prepend_bos", action="store_false", help="No BOS per sequence."
    )
    cache.add_argument("--out", required=False, help="Cache folder.")
    cache.add_argument("--overwrite", action="store_true", help="Replace an existing cache folder's files.")

    evaluate = sub.add_parser(
        "eval",
        help="Evaluate one or more SAEs side by side on held-out text.",
        description="Spliced CE/KL, L0, MSE, explained variance, dead latents.",
    )
    _common(evaluate)
    evaluate.add_argument(
        "--sae",
        action="append",
        required=False,
        help="RELEASE:SAE_ID or a local SAE folder; repeat to compare.",
    )
    evaluate.add_argument(
        "--model", default=None, help="Model (default: the first SAE's metadata model_name)."
    )
    evaluate.add_argument(
        "--data", default=None, help="Evaluation data (default: the corpus's held-out files)."
    )
    evaluate.add_argument(
        "--n-tokens", type=int, default=20_480, help="Tokens to evaluate (default: %(default)s)."
    )
    evaluate.add_argument(
        "--context-size", type=int, default=None, help="Tokens per sequence (default: the SAE's)."
    )
    evaluate.add_argument(
        "--batch-size", type=int, default=4, help="Sequences per batch (default: %(default)s)."
    )
    evaluate.add_argument(
        "--exclude-first-positions",
        type=int,
        default=0,
        help="Positions left out at the start of each sequence.",
    )
    evaluate.add_argument(
        "--out", default=None, help="Folder for report.json/report.md (default: print only)."
    )
    evaluate.add_argument(
        "--overwrite", action="store_true", help="Replace an earlier eval's report in --out."
    )
    saebench = sub.add_parser(
        "saebench",
        help="SAEBench's evals on SAEs side by side (before/after a fine-tune).",
        description="Runs SAEBench's own evals (core, absorption, meta_structure; sae-bench 0.6.0, "
        "the [saebench] extra) on every --sae and writes saebench.json, saebench.md (one column per "
        "SAE and the difference from the first), saebench.png and SAEBench's result files.",
    )
    _common(saebench)
    saebench.add_argument(
        "--sae",
        action="append",
        default=[],
        help="NAME=PATH_OR_RELEASE:SAE_ID; repeat (the first is the baseline of the differences). "
        "A folder kl_finetune wrote alone (--sae after=FOLDER) brings its starting SAE as 'before'.",
    )
    saebench.add_argument(
        "--evals",
        default="core,absorption,meta_structure",
        help="Comma-separated evals (default: %(default)s).",
    )
    saebench.add_argument(
        "--model", default=None, help="Model (default: the first SAE's metadata model_name)."
    )
    saebench.add_argument(
        "--data", default=None, help="core's text (default: Django's held-out docs, from PyPI)."
    )
    saebench.add_argument(
        "--absorption-words",
        type=_positive_int,
        default=None,
        help="Evaluate absorption on a seeded sample of this many of the tokenizer's alphabetic tokens "
        "(default: all, as SAEBench; hours on a CPU).",
    )
    saebench.add_argument(
        "--eval-config",
        default=None,
        help='JSON of SAEBench config fields per eval, e.g. \'{"core": {"context_size": 256}}\'.',
    )
    saebench.add_argument(
        "--quick", action="store_true", help="Small sizes (minutes on a CPU; a smoke test)."
    )
    saebench.add_argument("--device", default=None, help="Device (default: cpu).")
    saebench.add_argument("--out", default="saebench", help="Output folder (default: %(default)s).")
    saebench.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output folder's files."
    )
    circuits = sub.add_parser(
        "circuits",
        help="Attribution with the error node for SAEs side by side (e.g. before and after a fine-tune).",
        description="Scores every latent and the error node by attribution patching (Marks et al. "
        "2024) on an induction task built from held-out text, and the faithfulness of the top-N "
        "latents; writes circuits.json/.md/.png.",
    )
    _common(circuits)
    circuits.add_argument("--sae", action="append", help="NAME=SAE (RELEASE:SAE_ID or a folder); repeat.")
    circuits.add_argument("--model", default=None, help="Model (default: the first SAE's model_name).")
    circuits.add_argument(
        "--data", default=None, help="Text for the prompts (default: the corpus's held-out files)."
    )
    circuits.add_argument("--prompts", type=_positive_int, default=16, help="Prompts (default: %(default)s).")
    circuits.add_argument(
        "--length", type=_positive_int, default=24, help="Tokens per repeated span (default: %(default)s)."
    )
    circuits.add_argument(
        "--sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 3, 10, 30, 100, 300, 1000],
        help="Numbers of top latents for the faithfulness curve (default: 1,3,10,30,100,300,1000).",
    )
    circuits.add_argument(
        "--method",
        choices=["atp", "ig"],
        default="atp",
        help="Scores: attribution patching (atp, one backward pass) or integrated gradients (ig, "
        "--ig-steps backward passes per hook) (default: %(default)s).",
    )
    circuits.add_argument(
        "--ig-steps",
        type=_positive_int,
        default=10,
        help="Integrated-gradients steps (default: %(default)s).",
    )
    circuits.add_argument("--out", default=None, help="Output folder (default: print only).")
    circuits.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output folder's files."
    )
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        values = _read_config_file(parser, args.config)
        sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        known = {action.dest for action in sub._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {args.config}: unknown options {unknown}")
        actions = {action.dest: action for action in sub._actions}
        try:
            typed = {name: _config_value(actions[name], value) for name, value in values.items()}
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            parser.error(f"--config {args.config}: {error}")
        sub.set_defaults(**typed)
        args = parser.parse_args(argv)
    return args


def _config_value(action: argparse.Action, value: Any) -> Any:
    """A --config value checked as the flag's own parser would check it: a flag that takes a
    value gets it through the flag's type (an int flag refuses 2.5 and True), a switch takes
    True or False, a list flag a list."""
    name = action.dest
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {value!r} is not true or false")
        return value
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            raise TypeError(f"{name}: {value!r} is not a list")
        return [_config_item(action, item) for item in value]
    return _config_item(action, value)


def _config_item(action: argparse.Action, value: Any) -> Any:
    kind = action.type or str
    if isinstance(value, (bool, list, dict)):
        raise TypeError(f"{action.dest}: {value!r} is not a {getattr(kind, '__name__', 'value')}")
    if kind is str and not isinstance(value, str):
        raise TypeError(f"{action.dest}: {value!r} is not a string")
    if kind is int and isinstance(value, float):
        raise TypeError(f"{action.dest}: {value!r} is not an integer")
    try:
        converted = kind(str(value)) if callable(kind) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{action.dest}: {value!r} is not valid ({error})") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{action.dest}: {value!r} is not one of {list(action.choices)}")
    return converted


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
