"""One rank of the data-parallel runs tests/test_distributed.py launches with torchrun (gloo, CPU):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT

Every rank builds the same tiny float64 model, SAEs and tokens (the runs equal the single-process
ones the test computes to float64 rounding), fine-tunes with distributed=True and rank 0 saves.
Errors a run is expected to raise are written to OUT/errors_rank<r>.json.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_sae, random_tokens, tiny_model  # noqa: E402

from sae_lens_kl import kl_finetune  # noqa: E402
from sae_lens_kl.cache import build_cache  # noqa: E402

SEQ = 16
DATA = random_tokens(96, seq=SEQ)
STEPS = 6
OPTIONS: dict[str, Any] = {
    "tokens": STEPS * 4 * SEQ,
    "batch_size": 4,
    "eval_tokens": 12 * SEQ,
    "eval_batch_size": 4,
    "kl_chunk_tokens": 16,
    "lr": 2e-3,
}


def model(dtype: torch.dtype = torch.float64) -> Any:
    return tiny_model(dtype=dtype)


def sae(
    architecture: str = "topk", hook_name: str = "blocks.1.hook_resid_pre", dtype: torch.dtype = torch.float64
) -> Any:
    return make_sae(architecture, hook_name=hook_name, dtype=str(dtype).removeprefix("torch.")).to(dtype)


class Kill(Exception):
    pass


def kill_at_step(step: int) -> Any:
    def callback(trainer: Any, _: Any) -> None:
        if trainer.n_training_steps == step:
            raise Kill

    return callback


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    errors: dict[str, str] = {}
    lm = model()

    # the reference run (two SAE architectures), with checkpoints
    for architecture in ("topk", "standard"):
        kl_finetune(
            sae(architecture),
            lm,
            DATA,
            save_dir=out / architecture,
            checkpoint_every_tokens=2 * 4 * SEQ,
            distributed=True,
            **OPTIONS,
        )
    # killed after step 3 (a checkpoint at step 2), then resumed: the "topk" run's weights
    with contextlib.suppress(Kill):
        kl_finetune(
            sae(),
            lm,
            DATA,
            save_dir=out / "killed",
            checkpoint_every_tokens=2 * 4 * SEQ,
            callbacks=[kill_at_step(3)],
            distributed=True,
            **OPTIONS,
        )
    kl_finetune(
        sae(), lm, DATA, save_dir=out / "killed", resume_from=out / "killed", distributed=True, **OPTIONS
    )
    # several SAEs per pass
    kl_finetune(
        [sae(), sae("topk", "blocks.2.hook_resid_pre")],
        lm,
        DATA,
        save_dir=out / "multi",
        distributed=True,
        **OPTIONS,
    )
    # from a clean-pass cache (rank 0 builds it)
    if rank == 0:
        build_cache(
            lm, DATA, "blocks.1.hook_resid_pre", out / "cache", tokens=len(DATA) * SEQ, context_size=SEQ
        )
    dist.barrier()
    kl_finetune(sae(), lm, out / "cache", save_dir=out / "cached", distributed=True, **OPTIONS)

    # bad input: ranks given different settings; a batch the ranks cannot split
    bad: dict[str, dict[str, Any]] = {
        "different_lr": {**OPTIONS, "lr": OPTIONS["lr"] * (1 + rank)},
        "odd_batch": {**OPTIONS, "batch_size": 3},
    }
    for name, options in bad.items():
        try:
            kl_finetune(sae(), lm, DATA, save_dir=out / name, distributed=True, **options)
        except ValueError as error:
            errors[name] = str(error)
    (out / f"errors_rank{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
