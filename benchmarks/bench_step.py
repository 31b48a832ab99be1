"""Benchmark one KL+MSE fine-tune step: the reference step vs sae_lens_kl's engine.

The reference step is how every public implementation computes it (Karvonen 2025's code, e2e_sae,
sparsify, LoRA-for-SAEs): a clean full forward under no-grad, a spliced full forward with the SAE
run once inside the hook (its MSE taken from that call), F.kl_div on full [B, T, V] log-probs,
loss 0.5*(mse + alpha*kl), backward, Adam step. Ours goes through the public engine
(`KLFinetuneTrainer.step`) with the same SAE weights and tokens. Before timing, every variant's KL,
MSE and SAE gradients are checked against the reference step's (relative difference < 1e-5, or the
script exits).

Model: GPT-2-small-shaped HookedTransformer with random weights (speed does not depend on trained
weights); SAE: TopK, d_sae = 16*768, k = 64, at blocks.{2,6,10}.hook_resid_pre.

    python benchmarks/bench_step.py --threads 2            # T=256, table
    python benchmarks/bench_step.py --threads 2 --json      # plus one JSON object on the last line
    python benchmarks/bench_step.py --threads 2 --long      # + peak memory at T=1024 (+ checkpoint_suffix)
    python benchmarks/bench_step.py --threads 2 --compile   # also with compile_blocks=True
    python benchmarks/bench_step.py --threads 2 --sparsify  # also EleutherAI sparsify (bench extra)
    python benchmarks/bench_step.py --threads 2 --phases    # where an online step's time goes

Timings alternate reference and ours in one process after warm-up (median of --repeats); sparsify
alternates with ours in rounds of 3 steps, its SAE at the same place in the network. Peak
memory is measured per variant in its own subprocess: peak RSS above the baseline after model
construction (CPU; /proc/self/clear_refs resets the high-water mark), or
torch.cuda.max_memory_allocated (GPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_kl import KLFinetuneConfig, KLFinetuneTrainer
from sae_lens_kl.cache import build_cache
from sae_lens_kl.kl import kl_divergence
from sae_lens_kl.runs import SpliceRunner, shared_clean_runs
from sae_lens_kl.sparse_topk import use_sparse_topk
from sae_lens_kl.splice import CompiledBlocks, HookSite, run_prefix, run_to_output
from sae_lens_kl.vocab import VocabProjection

D_MODEL, VOCAB = 768, 50257


def build_model(device: str) -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=D_MODEL,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=VOCAB,
        n_ctx=1024,
        act_fn="gelu_new",
        normalization_type="LN",
        model_name="gpt2-shaped-random",
        device=device,
    )
    model = HookedTransformer(cfg)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def build_sae(layer: int, device: str, seed: int = 1) -> TopKTrainingSAE:
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(
        d_in=D_MODEL, d_sae=16 * D_MODEL, k=64, device=device, rescale_acts_by_decoder_norm=False
    )
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_pre"
    return TopKTrainingSAE(cfg)


class ReferenceStep:
    """Two full forwards with hooks; the SAE runs once, inside the spliced forward's hook."""

    def __init__(self, model: HookedTransformer, sae: TopKTrainingSAE) -> None:
        self.model, self.sae = model, sae
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=5e-5)

    def __call__(self, tokens: torch.Tensor) -> tuple[float, float]:
        hook_name = self.sae.cfg.metadata.hook_name
        with torch.no_grad():
            clean_logits = self.model(tokens)
        captured: dict[str, Any] = {}

        def splice(acts: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
            out = self.sae.training_forward_pass(
                TrainStepInput(
                    sae_in=acts.flatten(0, 1),
                    coefficients={},
                    dead_neuron_mask=None,
                    n_training_steps=0,
                    is_logging_step=False,
                )
            )
            captured["out"] = out
            return out.sae_out.view_as(acts)

        spliced_logits = self.model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)])
        log_p = F.log_softmax(clean_logits.float(), dim=-1)
        log_q = F.log_softmax(spliced_logits.float(), dim=-1)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()
        out = captured["out"]
        mse = out.losses["mse_loss"]
        alpha = (mse / (kl + 1e-8)).detach()
        loss = 0.5 * (mse + alpha * kl) + (out.loss - mse)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return kl.item(), mse.item()


class OurStep:
    """The public engine: SAELens trainer subclass, prefix reuse, chunked KL."""

    def __init__(
        self,
        model: HookedTransformer,
        sae: TopKTrainingSAE,
        seq: int,
        batch: int,
        compile_blocks: bool = False,
        checkpoint_suffix: bool = False,
    ) -> None:
        cfg = KLFinetuneConfig(
            tokens=10**12,
            batch_size=batch,
            context_size=seq,
            exclude_special_tokens=False,
            compile_blocks=compile_blocks,
            checkpoint_suffix=checkpoint_suffix,
        )
        site = HookSite.for_model(model, sae.cfg.metadata.hook_name, None)
        blocks = CompiledBlocks(model) if compile_blocks else None
        runner = SpliceRunner(model, site, blocks=blocks, checkpoint_suffix=checkpoint_suffix)
        self.trainer = KLFinetuneTrainer(sae, runner, iter(()), cfg, context_size=seq)

    def __call__(self, tokens: torch.Tensor) -> tuple[float, float]:
        return self.take(self.trainer.runner.clean_run(tokens))

    def take(self, batch: Any) -> tuple[float, float]:
        output = self.trainer.step(batch)
        self.trainer.n_training_steps += 1
        return float(output.metrics["kl"]), output.losses["mse_loss"].item()


class CachedStep(OurStep):
    """The engine fed from a clean-pass cache of the same tokens (built once, read every step)."""

    def __init__(
        self,
        model: HookedTransformer,
        sae: TopKTrainingSAE,
        seq: int,
        batch: int,
        compile_blocks: bool = False,
    ) -> None:
        super().__init__(model, sae, seq, batch, compile_blocks)
        self.folder = tempfile.mkdtemp(prefix="bench-cache-")
        tokens = make_tokens(batch, seq).to(model.cfg.device)
        cache = build_cache(
            model,
            tokens,
            sae.cfg.metadata.hook_name,
            self.folder,
            tokens=batch * seq,
            context_size=seq,
            prepend_bos=False,
            batch_size=batch,
        )
        self.runs = cache.runs(self.trainer.runner, batch)

    def __call__(self, tokens: torch.Tensor) -> tuple[float, float]:  # noqa: ARG002 (the cache holds them)
        return self.take(next(self.runs))


class MultiStep:
    """N SAEs at one hook through the engine's shared clean pass (as kl_finetune([...]) runs them)."""

    def __init__(
        self,
        model: HookedTransformer,
        saes: list[TopKTrainingSAE],
        seq: int,
        batch: int,
        compile_blocks: bool = False,
    ) -> None:
        self.model = model
        self.steps = [OurStep(model, sae, seq, batch, compile_blocks) for sae in saes]
        # one compiled set of blocks serves every SAE, as in kl_finetune
        first = self.steps[0].trainer.runner
        self.runners = {
            str(i): SpliceRunner(model, step.trainer.runner.site, blocks=first.blocks)
            for i, step in enumerate(self.steps)
        }

    def __call__(self, tokens: torch.Tensor) -> tuple[float, float]:
        runs = next(shared_clean_runs(self.model, iter([tokens]), self.runners))
        numbers = [step.take(runs[name]) for name, step in zip(self.runners, self.steps, strict=True)]
        return numbers[0]


def time_multi(
    args: argparse.Namespace, model: HookedTransformer, n: int, layer: int, compile_blocks: bool
) -> dict[str, float]:
    """N separate reference steps vs one multi-SAE step, alternating."""
    tokens = make_tokens(args.batch, args.seq).to(args.device)
    saes = [build_sae(layer, args.device, seed=1 + i) for i in range(n)]
    references = [ReferenceStep(model, build_sae(layer, args.device, seed=1 + i)) for i in range(n)]
    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "reference": lambda t: [step(t) for step in references],
        "ours": MultiStep(model, saes, args.seq, args.batch, compile_blocks),
    }
    return alternate(args, variants, tokens, max(3, args.repeats // 2))


def alternate(
    args: argparse.Namespace,
    steps: dict[str, Callable[[torch.Tensor], Any]],
    tokens: torch.Tensor,
    repeats: int,
) -> dict[str, float]:
    """Median ms per step of each variant, run in turn (so drift hits all alike) after warm-up."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.warmup + repeats):
        for name, step in steps.items():
            sync(args.device)
            started = time.perf_counter()
            step(tokens)
            sync(args.device)
            if repeat >= args.warmup:
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


class SparsifySteps:
    """EleutherAI sparsify 1.3.3's KL fine-tune mode (`pip install -e .[bench]`) on an HF GPT-2 of the
    same shape with random weights, TopK 12288/k=64, same tokens per step.

    The SAE sits at the same place in the network as ours: sparsify replaces the output of HF block
    `h.{layer-1}`, which is TransformerLens's `blocks.{layer}.hook_resid_pre` (the issue's `h.6` is
    one block later than our layer-6 SAE, so it would give sparsify one fewer block to backpropagate
    through). Step times are the intervals between its optimizer steps inside `Trainer.fit` (data
    loading and its bookkeeping included, as in its real loop); the first step is warm-up."""

    def __init__(self, args: argparse.Namespace, layer: int) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        self.args, self.layer = args, layer
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(
            GPT2Config(n_layer=12, n_embd=D_MODEL, n_head=12, n_positions=1024, vocab_size=VOCAB)
        ).eval()

    def __call__(self, n_steps: int) -> list[float]:
        """ms of each of n_steps steps after one warm-up step."""
        from datasets import Dataset
        from sparsify import SparseCoderConfig, TrainConfig, Trainer

        args = self.args
        tokens = torch.cat([make_tokens(args.batch, args.seq)] * (n_steps + 1))
        dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
        cfg = TrainConfig(
            SparseCoderConfig(num_latents=16 * D_MODEL, k=64),
            batch_size=args.batch,
            loss_fn="kl",
            hookpoints=[f"h.{self.layer - 1}"],
            save_dir=tempfile.mkdtemp(),
            save_every=10**9,
            log_to_wandb=False,
            lr_warmup_steps=0,
        )
        trainer = Trainer(cfg, dataset, self.model)
        stamps: list[float] = []
        optimizer = trainer.optimizers[-1]  # a schedule-free wrapper: no step hooks, so wrap step
        optimizer_step = optimizer.step

        def timed_step(*step_args: Any, **step_kwargs: Any) -> Any:
            result = optimizer_step(*step_args, **step_kwargs)
            stamps.append(time.perf_counter())
            return result

        optimizer.step = timed_step
        trainer.fit()
        return [(later - earlier) * 1000 for earlier, later in zip(stamps[:-1], stamps[1:], strict=True)]


def time_vs_sparsify(
    args: argparse.Namespace, model: HookedTransformer, layer: int, variants: list[str]
) -> dict[str, float]:
    """Our variants and sparsify, in alternating rounds of a few steps each (the machine's speed
    drifts over minutes); median over all steps of each."""
    tokens = make_tokens(args.batch, args.seq).to(args.device)
    ours = {
        name: VARIANTS[name](model, build_sae(layer, args.device), args.seq, args.batch) for name in variants
    }
    peer = SparsifySteps(args, layer)
    times: dict[str, list[float]] = {name: [] for name in [*variants, "sparsify"]}
    per_round = 3
    for _ in range(max(2, args.repeats // 2)):
        for name, step in ours.items():
            step(tokens)  # warm-up after the other variants ran
            for _ in range(per_round):
                started = time.perf_counter()
                step(tokens)
                sync(args.device)
                times[name].append((time.perf_counter() - started) * 1000)
        times["sparsify"] += peer(per_round)
    return {name: statistics.median(values) for name, values in times.items()}


def phase_times(args: argparse.Namespace, model: HookedTransformer, layer: int) -> dict[str, float]:
    """Where one online step's time goes: the engine's parts run one after another (median ms)."""
    tokens = make_tokens(args.batch, args.seq).to(args.device)
    sae = build_sae(layer, args.device)
    use_sparse_topk(sae, args.device == "cpu")
    site = HookSite.for_model(model, sae.cfg.metadata.hook_name, None)
    projection = VocabProjection.for_run(model, prefix_reuse=True)
    optimizer = torch.optim.Adam(sae.parameters(), lr=5e-5, fused=True)
    times: dict[str, list[float]] = {}
    for repeat in range(args.warmup + args.repeats):
        marks = [("start", time.perf_counter())]

        def mark(name: str, marks: list[tuple[str, float]] = marks) -> None:
            sync(args.device)
            marks.append((name, time.perf_counter()))

        with torch.no_grad():
            prefix = run_prefix(model, tokens, site)
            mark("prefix")
            clean, acts = run_to_output(model, tokens, prefix, site)
            mark("clean suffix")
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=acts.flatten(0, 1),
                coefficients={},
                dead_neuron_mask=None,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        mark("SAE forward")
        spliced, _ = run_to_output(model, tokens, prefix, site, lambda a, out=out: out.sae_out.view_as(a))
        mark("spliced suffix")
        kl = kl_divergence(clean.flatten(0, 1), spliced.flatten(0, 1), projection, 256)
        mark("KL (+ its gradient)")
        mse = out.losses["mse_loss"]
        (0.5 * (mse + (mse / (kl + 1e-8)).detach() * kl)).backward()
        mark("backward")
        optimizer.step()
        optimizer.zero_grad()
        mark("Adam")
        if repeat >= args.warmup:
            for (_, before), (name, after) in zip(marks[:-1], marks[1:], strict=True):
                times.setdefault(name, []).append((after - before) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def make_tokens(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(2))


VARIANTS: dict[str, Callable[..., Callable[[torch.Tensor], float]]] = {
    "reference": lambda model, sae, seq, batch: ReferenceStep(model, sae),  # noqa: ARG005
    "ours": OurStep,
    "cached": CachedStep,
    "ours-compiled": functools.partial(OurStep, compile_blocks=True),
    "cached-compiled": functools.partial(CachedStep, compile_blocks=True),
    "ours-checkpointed": functools.partial(OurStep, checkpoint_suffix=True),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_numbers(
    make: Callable[..., Callable[[torch.Tensor], tuple[float, float]]],
    model: HookedTransformer,
    args: argparse.Namespace,
    layer: int,
    tokens: torch.Tensor,
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """KL, MSE and the SAE's gradients (before clipping) of one step from the shared initial SAE."""
    sae = build_sae(layer, args.device)
    step = make(model, sae, args.seq, args.batch)
    grads: dict[str, torch.Tensor] = {}
    for name, parameter in sae.named_parameters():
        parameter.register_hook(lambda grad, name=name: grads.__setitem__(name, grad.detach().clone()))
    kl, mse = step(tokens)
    return kl, mse, grads


def check_same_numbers(
    args: argparse.Namespace, layer: int, model: HookedTransformer, variants: list[str]
) -> float:
    """Every variant's KL, MSE and SAE gradients against the reference step's (relative difference
    < 1e-5; the loss alone proves nothing, alpha makes it equal the MSE). Exits on a mismatch."""
    tokens = make_tokens(args.batch, args.seq).to(args.device)
    ref_kl, ref_mse, ref_grads = step_numbers(VARIANTS["reference"], model, args, layer, tokens)
    worst = 0.0
    for variant in variants:
        kl, mse, grads = step_numbers(VARIANTS[variant], model, args, layer, tokens)
        differences = {"kl": abs(kl - ref_kl) / abs(ref_kl), "mse": abs(mse - ref_mse) / abs(ref_mse)}
        for name, grad in ref_grads.items():
            differences[f"d{name}"] = float((grads[name] - grad).norm() / grad.norm())
        name, largest = max(differences.items(), key=lambda item: item[1])
        if largest >= 1e-5:
            raise SystemExit(f"layer {layer} {variant}: {name} differs from the reference by {largest:.2e}")
        worst = max(worst, largest)
    return worst


def time_variants(
    args: argparse.Namespace, layer: int, model: HookedTransformer, variants: list[str]
) -> dict[str, float]:
    tokens = make_tokens(args.batch, args.seq).to(args.device)
    steps = {
        name: VARIANTS[name](model, build_sae(layer, args.device), args.seq, args.batch) for name in variants
    }
    return alternate(args, steps, tokens, args.repeats)


def peak_memory_child(args: argparse.Namespace) -> None:
    """Run in a subprocess: setup, then two steps of one variant; print peak memory above setup."""
    model = build_model(args.device)
    tokens = make_tokens(args.batch, args.seq)
    step = VARIANTS[args.variant](model, build_sae(args.layer, args.device), args.seq, args.batch)
    tokens = tokens.to(args.device)
    if args.device.startswith("cuda"):
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        for _ in range(2):
            step(tokens)
        sync(args.device)
        peak = torch.cuda.max_memory_allocated() - baseline
    else:

        def status(field: str) -> int:
            lines = open("/proc/self/status").read().splitlines()  # noqa: SIM115
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))

        baseline = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak-RSS high-water mark
        for _ in range(2):
            step(tokens)
        peak = status("VmHWM:") - baseline
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(args: argparse.Namespace, variant: str, layer: int, seq: int) -> int:
    command = [
        sys.executable,
        __file__,
        "--_memory-child",
        "--variant",
        variant,
        "--layer",
        str(layer),
        "--seq",
        str(seq),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", default="2,6,10")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--long", action="store_true", help="also measure peak memory at T=1024")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument(
        "--compile", action="store_true", help="also time the engine with compile_blocks=True (torch.compile)"
    )
    parser.add_argument("--phases", action="store_true", help="also print where an online step's time goes")
    parser.add_argument("--no-multi", dest="multi", action="store_false", help="skip the 4-SAE measurement")
    parser.add_argument(
        "--sparsify", action="store_true", help="also time EleutherAI sparsify's KL step (bench extra)"
    )
    parser.add_argument("--_memory-child", dest="memory_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--layer", type=int, default=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(args)
        return

    model = build_model(args.device)
    layers = [int(x) for x in args.layers.split(",")]
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, device {args.device}, torch threads {args.threads}, "
        f"torch {torch.__version__}; B={args.batch} T={args.seq}; median of {args.repeats} after "
        f"{args.warmup} warm-up"
    )
    ours = ["ours", "cached"] + (["ours-compiled", "cached-compiled"] if args.compile else [])
    for layer in layers:
        worst = check_same_numbers(args, layer, model, ours)
        print(
            f"layer {layer}: KL, MSE and SAE gradients of {ours} match the reference "
            f"(max rel. diff {worst:.1e})"
        )
    print(f"{'layer':>5} {'variant':>15} {'ms/step':>9} {'tokens/s':>9} {'speedup':>8}")
    speedups: dict[str, dict[str, float]] = {name: {} for name in ours}
    for layer in layers:
        medians = time_variants(args, layer, model, ["reference", *ours])
        reference = medians["reference"]
        for name, ms in medians.items():
            speedup = reference / ms
            print(
                f"{layer:>5} {name:>15} {ms:>9.1f} {args.batch * args.seq / ms * 1000:>9.0f} {speedup:>8.2f}"
            )
            if name != "reference":
                speedups[name][str(layer)] = speedup

    if args.phases:
        phases = phase_times(args, model, 6)
        print("online step at layer 6, by part (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    multi: dict[str, float] = {}
    if args.multi:
        for compile_blocks in [False, True] if args.compile else [False]:
            times = time_multi(args, model, 4, 6, compile_blocks)
            label = "ours-compiled" if compile_blocks else "ours"
            multi[label] = times["reference"] / times["ours"]
            print(
                f"4 SAEs at layer 6 ({label}): 4 reference steps {times['reference']:.0f} ms, one multi-SAE "
                f"step {times['ours']:.0f} ms, speedup {multi[label]:.2f}"
            )
    vs_sparsify: dict[str, dict[str, float | None]] = {"ours": {"online": None, "cached": None}}
    if args.sparsify:
        paired = time_vs_sparsify(args, model, 6, ours)
        print(
            "sparsify 1.3.3 KL step, SAE at h.5 output (= blocks.6.hook_resid_pre): "
            f"{paired['sparsify']:.0f} ms"
        )
        for online in ours[::2]:
            cached = online.replace("ours", "cached")
            vs_sparsify[online] = {
                "online": paired["sparsify"] / paired[online],
                "cached": paired["sparsify"] / paired[cached],
            }
            print(
                f"  {online}: online {paired[online]:.0f} ms ({vs_sparsify[online]['online']:.2f}x), "
                f"cached {paired[cached]:.0f} ms ({vs_sparsify[online]['cached']:.2f}x)"
            )
    results: dict[str, Any] = {
        "online_speedup": speedups["ours"],
        "online_peak_mem_ratio_T1024": None,
        "cached_speedup": speedups["cached"],
        "multi_sae_speedup_n4": multi.get("ours"),
        "vs_sparsify": vs_sparsify["ours"],
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "device": args.device,
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "shape": {"batch": args.batch, "seq": args.seq, "repeats": args.repeats},
    }
    if args.compile:
        results["compile_blocks"] = {
            "online_speedup": speedups["ours-compiled"],
            "cached_speedup": speedups["cached-compiled"],
            "multi_sae_speedup_n4": multi.get("ours-compiled"),
            "vs_sparsify": vs_sparsify.get("ours-compiled"),
        }
    if args.long:
        peaks = {
            name: peak_memory(args, name, 6, 1024) for name in ("reference", "ours", "ours-checkpointed")
        }
        for name, peak in peaks.items():
            print(f"peak memory above setup, layer 6, T=1024, {name}: {peak / 2**20:.0f} MiB")
        results["online_peak_mem_ratio_T1024"] = peaks["ours"] / peaks["reference"]
        results["checkpointed_peak_mem_ratio_T1024"] = peaks["ours-checkpointed"] / peaks["ours"]
        results["peak_mem_bytes_T1024"] = peaks
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
