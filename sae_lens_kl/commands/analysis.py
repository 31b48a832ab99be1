"""`circuits` and `saebench`: analyses of SAEs side by side (before and after a fine-tune)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sae_lens_kl.commands.common import check_out, load_sae, named_saes
from sae_lens_kl.corpus import django_docs
from sae_lens_kl.data import token_sequences
from sae_lens_kl.models import load_model
from sae_lens_kl.staging import write_file


def circuits(args: argparse.Namespace) -> None:
    from matplotlib.figure import Figure

    from sae_lens_kl.circuits import circuits_markdown, compare_circuits, induction_task
    from sae_lens_kl.data import take
    from sae_lens_kl.report import save_figure

    named: dict[str, list[str]] = {}
    for spec in args.sae or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--sae {spec!r}: write NAME=SAE (e.g. before=./mse_sae).")
        named.setdefault(name, []).append(path)
    if not named:
        raise SystemExit("circuits needs --sae NAME=SAE, e.g. --sae before=A --sae after=B.")
    out = check_out(args.out, args.overwrite)
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


def saebench(args: argparse.Namespace) -> None:
    from sae_lens_kl import saebench as bench

    named = named_saes(args.sae)
    bench.check_names(dict(named))
    evals = bench.check_evals([name.strip() for name in args.evals.split(",") if name.strip()])
    out = check_out(args.out, args.overwrite)
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


def export(args: argparse.Namespace) -> None:
    from sae_lens_kl.export import export_circuit_tracer

    if not args.set or not args.out or args.n_layers is None:
        raise SystemExit(
            "export needs --set (transcoder folders, or a run folder), --out and --n-layers (the model's "
            "layer count: circuit-tracer would take a missing layer for all error nodes)."
        )
    folders = [Path(folder).expanduser() for folder in args.set]
    if len(folders) == 1 and not (folders[0] / "cfg.json").is_file():
        # a several-per-pass run folder: its SAEs in index order
        runs = sorted(folders[0].glob("sae_*/cfg.json"), key=lambda cfg: int(cfg.parent.name.split("_")[1]))
        folders = [cfg.parent for cfg in runs] or folders
    transcoders = [load_sae(str(folder)) for folder in folders]
    out = export_circuit_tracer(
        transcoders, args.out, n_layers=args.n_layers, scan=args.scan, overwrite=args.overwrite
    )
    loader = f"load_transcoder_from_hub('{out.resolve()}')"
    print(f"wrote {len(transcoders)} transcoders to {out} (circuit-tracer: {loader})")
