"""`finetune`, `train`, `eval` and `cache`: fine-tune, train with a final KL phase, evaluate side by
side, cache a clean pass."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sae_lens_kl.api import kl_finetune
from sae_lens_kl.checkpoints import CHECKPOINTS_DIRNAME, FINETUNE_STATE_FILENAME
from sae_lens_kl.commands.common import check_out, load_sae, report_of_another_command, text_or_corpus
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.evaluation import evaluate as evaluate_sae
from sae_lens_kl.models import load_model
from sae_lens_kl.parallel import init_process_group, launched_processes
from sae_lens_kl.recipes import DEMO_MSE_RECIPE
from sae_lens_kl.report import History, write_report
from sae_lens_kl.save_dir import exclusive
from sae_lens_kl.staging import write_file
from sae_lens_kl.train import runner_config, train_with_kl_phase


def finetune(args: argparse.Namespace) -> None:
    if not args.sae:
        raise SystemExit("finetune needs --sae RELEASE:SAE_ID or a local SAE folder.")
    if args.tokens is None:
        raise SystemExit("finetune needs --tokens (the training token budget).")
    if args.resume is not None and args.out is None:  # continue in the folder of the run resumed
        args.out = str(_run_folder(Path(args.resume).expanduser()))
    out = check_out(args.out, args.overwrite or args.resume is not None)
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
    out = check_out(args.out, args.overwrite)
    options = KLFinetuneConfig.options_in(args, drop=("context_size",))
    if args.continue_optimizer:  # one Adam and one constant lr for both phases
        options.update(lr=args.mse_lr, lr_schedule="constant")
    KLFinetuneConfig(tokens=args.training_tokens, **options)  # validate before loading anything
    model = load_model(args.model, device=args.device or "cpu")
    data, eval_data = text_or_corpus(args.data, args.eval_data)
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
    out = check_out(args.out, args.overwrite)
    if out is not None and (other := report_of_another_command(out, "# sae_lens_kl eval")):
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
