"""Training tokens/s of a data-parallel fine-tune (torchrun, gloo on CPU) against one process.

    python benchmarks/bench_distributed.py                 # 1 process x 1 thread, 1 x 2, 2 x 1
    python benchmarks/bench_distributed.py --json          # plus one JSON object on the last line

Model: a random HookedTransformer (4 layers, d_model 256, vocab 8192, so the KL's unembedding
products matter as in a real LM), a TopK SAE (d_sae 4096, k 32) at blocks.2.hook_resid_pre,
global batch 8 x 128 tokens, 24 steps; tokens/s is the fine-tune's own
`train_tokens_per_second` (the training loop, evaluation and setup excluded), rank 0's.
On a 2-core machine 2 processes x 1 thread against 1 process x 2 threads measures the cost of the
data-parallel step (the all-reduces and the per-step synchronisation) at equal CPU, not the speed-up
a second GPU gives.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

D_MODEL, LAYERS, VOCAB, SEQ, BATCH, STEPS = 256, 4, 8192, 128, 8, 24


def worker(out: Path) -> None:
    """One rank: the fine-tune, its report written by rank 0."""
    import torch.distributed as dist
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_lens_kl import kl_finetune

    distributed = "LOCAL_RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=LAYERS,
        d_model=D_MODEL,
        n_heads=4,
        d_head=64,
        d_mlp=4 * D_MODEL,
        d_vocab=VOCAB,
        n_ctx=SEQ,
        act_fn="gelu",
        normalization_type="LN",
        model_name="bench-random",
    )
    model = HookedTransformer(cfg).eval()
    sae = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=4096, k=32, device="cpu"))
    sae.cfg.metadata.hook_name = "blocks.2.hook_resid_pre"
    sae.cfg.metadata.model_name = "bench-random"
    tokens = torch.randint(0, VOCAB, (BATCH * STEPS + 8, SEQ), generator=torch.Generator().manual_seed(1))
    tuned = kl_finetune(
        sae,
        model,
        tokens,
        tokens=BATCH * STEPS * SEQ,
        batch_size=BATCH,
        context_size=SEQ,
        eval_tokens=8 * SEQ,
        exclude_special_tokens=False,
        distributed=distributed,
    )
    if not distributed or dist.get_rank() == 0:
        out.write_text(json.dumps(tuned.cfg.metadata.kl_finetune["train_tokens_per_second"]))
    if distributed:
        dist.destroy_process_group()


def run(processes: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "tokens_per_second.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
        ]
        subprocess.run([*launch, __file__, "--worker", str(out)], env=env, check=True, capture_output=True)
        return float(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    results = {}
    print(f"{'processes':>9} {'threads':>7} {'train tokens/s':>14}")
    for processes, threads in ((1, 1), (1, 2), (2, 1)):
        results[f"{processes}x{threads}"] = tokens_per_second = run(processes, threads)
        print(f"{processes:>9} {threads:>7} {tokens_per_second:>14.0f}")
    print(f"2 processes x 1 thread vs 1 process x 2 threads: {results['2x1'] / results['1x2']:.2f}x")
    print(f"2 processes x 1 thread vs 1 process x 1 thread: {results['2x1'] / results['1x1']:.2f}x")
    if args.json:
        print(json.dumps({"tokens_per_second": results, "cores": os.cpu_count(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
