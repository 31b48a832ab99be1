"""How far the online KL+MSE step is from this machine's floor, part by part (issue: performance
against the machine's floor).

For the step at the GPT-2-small shape of bench_step.py (12 layers, d_model 768, vocabulary 50,257;
TopK SAE d_sae 12,288, k 64 at blocks.6.hook_resid_pre; batch 2 x 256 tokens), it counts the
floating-point operations of each part the step runs (bench_step.phase_times: prefix, clean
suffix, SAE forward, spliced suffix, the KL's three unembedding products, the backward pass,
Adam), measures the machine's float32 GEMM rate at the step's own matrix shapes with the kernels
the step uses (F.linear — MKL on CPU — for TransformerLens's blocks and SAELens's SAE; oneDNN's
linear for the unembedding products) and its memory bandwidth (for Adam, which moves memory, not
FLOPs), and prints each part's time as a multiple of its floor: FLOPs / the best GEMM rate
measured at any shape with either library (bytes / bandwidth for Adam).

    python benchmarks/roofline.py --threads 2            # table
    python benchmarks/roofline.py --threads 2 --json     # plus one JSON object on the last line

FLOP counts (2 per multiply-add), N = batch x seq tokens, T = seq, d = d_model, L = the SAE's block:
a block's forward is 24 N d^2 (QKV and output projections 8 N d^2, MLP 16 N d^2 at d_mlp 4d) plus
4 N T d (scores and pattern x values, all heads; TransformerLens forms the full T x T matrices);
its input-gradient backward is 24 N d^2 + 8 N T d (no weight gradients: the LM is frozen). The
SAE's encoder is 2 N d d_sae, its TopK decoder 2 N k d (sparse), its backward 4 N k d (weight
gradients of the chosen latents). The KL forms the clean and the spliced logits and the spliced
logits' input gradient: 3 x 2 N d V. Elementwise work (layer norms, GELU, softmax, log-softmax) is
not counted: the floor is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_step import D_MODEL, VOCAB, build_model, phase_times

from sae_lens_kl.compile_probe import cpu_name
from sae_lens_kl.vocab import onednn_linear, onednn_linear_available

N_LAYERS, D_SAE, K, LAYER = 12, 16 * D_MODEL, 64, 6


def part_flops(batch: int, seq: int) -> dict[str, float]:
    """FLOPs of each part of one online step (see the module docstring)."""
    n, d = batch * seq, D_MODEL
    block = 24 * n * d * d + 4 * n * seq * d
    block_backward = 24 * n * d * d + 8 * n * seq * d
    suffix = N_LAYERS - LAYER
    return {
        "prefix": LAYER * block,
        "clean suffix": suffix * block,
        "SAE forward": 2 * n * d * D_SAE + 2 * n * K * d,
        "spliced suffix": suffix * block,
        "KL (+ its gradient)": 3 * 2 * n * d * VOCAB,
        "backward": suffix * block_backward + 4 * n * K * d,
    }


def adam_bytes() -> float:
    """Adam's memory traffic: read parameter, gradient and both moments, write back three, float32,
    over the SAE's parameters (W_enc, W_dec, b_enc, b_dec)."""
    n_parameters = 2 * D_MODEL * D_SAE + D_SAE + D_MODEL
    return 7 * 4 * n_parameters


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rates(batch: int, seq: int, repeats: int) -> dict[str, dict[str, float]]:
    """GFLOP/s of float32 products at the step's shapes (rows x in -> out), by library: F.linear
    (MKL on CPU: TransformerLens's blocks and SAELens's SAE) and oneDNN's linear (the step's
    unembedding products, vocab.onednn_linear), where torch has it."""
    n = batch * seq
    shapes = {
        "attention projection": (n, D_MODEL, D_MODEL),
        "MLP": (n, D_MODEL, 4 * D_MODEL),
        "unembedding chunk": (256, D_MODEL, VOCAB),
        "SAE encoder": (n, D_MODEL, D_SAE),
        "square 2048": (2048, 2048, 2048),
    }
    libraries: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "F.linear": lambda x, weight: F.linear(x, weight)
    }
    rates: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(0)
    for name, (rows, inner, out) in shapes.items():
        x = torch.randn(rows, inner, generator=generator)
        weight = torch.randn(out, inner, generator=generator)
        chosen = dict(libraries)
        if onednn_linear_available(weight):
            chosen["oneDNN"] = lambda x, weight: onednn_linear(x, weight, None)
        rates[name] = {
            library: 2
            * rows
            * inner
            * out
            / median_seconds(lambda f=f, x=x, w=weight: f(x, w), repeats)
            / 1e9
            for library, f in chosen.items()
        }
    return rates


def bandwidth(repeats: int) -> float:
    """GB/s of an in-place float32 add over 64 Mi elements (read two, write one)."""
    a, b = torch.ones(1 << 26), torch.ones(1 << 26)
    seconds = median_seconds(lambda: a.add_(b), repeats)
    return 3 * 4 * a.numel() / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.device = "cpu"

    rates = gemm_rates(args.batch, args.seq, args.repeats)
    peak = max(rate for by_library in rates.values() for rate in by_library.values())
    gb_per_s = bandwidth(args.repeats)
    model = build_model("cpu")
    measured = phase_times(args, model, LAYER)  # ms per part, median of --repeats
    flops = part_flops(args.batch, args.seq)
    floors = {name: value / (peak * 1e9) * 1000 for name, value in flops.items()}
    floors["Adam"] = adam_bytes() / (gb_per_s * 1e9) * 1000

    cpu = cpu_name()
    print(f"{cpu}, {args.threads} threads, torch {torch.__version__}, batch {args.batch} x {args.seq} tokens")
    for name, by_library in rates.items():
        print(
            f"float32 GFLOP/s, {name}: " + ", ".join(f"{lib} {rate:.0f}" for lib, rate in by_library.items())
        )
    print(f"floor rate (best measured): {peak:.0f} GFLOP/s")
    print(f"memory bandwidth (in-place add): {gb_per_s:.1f} GB/s")
    print(f"{'part':<22}{'GFLOP':>8}{'ms':>9}{'floor ms':>10}{'x floor':>9}")
    for name, ms in measured.items():
        gflop = flops.get(name, 0.0) / 1e9
        print(f"{name:<22}{gflop:>8.2f}{ms:>9.1f}{floors[name]:>10.1f}{ms / floors[name]:>9.2f}")
    total, floor = sum(measured.values()), sum(floors.values())
    print(f"{'step':<22}{sum(flops.values()) / 1e9:>8.2f}{total:>9.1f}{floor:>10.1f}{total / floor:>9.2f}")
    if args.json:
        print(
            json.dumps(
                {
                    "cpu": cpu,
                    "threads": args.threads,
                    "torch": torch.__version__,
                    "gemm_gflops": rates,
                    "bandwidth_gb_s": gb_per_s,
                    "parts_ms": measured,
                    "floors_ms": floors,
                    "flops": flops,
                    "step_ms": total,
                    "step_floor_ms": floor,
                    "step_x_floor": total / floor,
                }
            )
        )


if __name__ == "__main__":
    main()
