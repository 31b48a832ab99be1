"""Data parallelism over torch.distributed: one process per device, launched by torchrun.

Every rank holds the frozen model and an identical SAE, and takes its own contiguous slice of each
global batch (`batch_size` sequences over all ranks). The step's losses are made global on every
rank: each term's value is the mean over all ranks' kept positions, its gradient this rank's share
of it, so alpha, the L0 the controller sees and the non-finite check are the same everywhere, and
the sum of the ranks' gradients (one all-reduce) is the single-process gradient of the global
batch. Firing statistics are summed, SAE buffers follow rank 0 (as PyTorch DDP's
broadcast_buffers), the held-out evaluation is split by batches and gathered, rank 0 alone writes
checkpoints, the artifact, progress and wandb.

PyTorch's DistributedDataParallel reduces gradients in hooks around a wrapped module's
`forward`; SAELens's trainer drives the SAE through `training_forward_pass` and its other methods
(sae-lens 6.54), so the SAE's gradients are all-reduced after backward instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel fine-tune; the default is a single process, for
    which every method is a no-op."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def of_run(cls, distributed: bool) -> DataParallel:
        """The current process group's ranks when `distributed`, else a single process."""
        if not distributed:
            return cls()
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group: launch with "
                "torchrun and call torch.distributed.init_process_group() before kl_finetune (the "
                "sae-lens-kl command does this for --distributed), or leave distributed off."
            )
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        """The rank that writes files, shows progress and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def part(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows of a global batch (its first dimension)."""
        if not self.active:
            return batch
        size = len(batch) // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def parts(self, items: list[T]) -> list[T]:
        """This rank's contiguous share of `items`; the first ranks take one more when they do not
        divide evenly."""
        per_rank, extra = divmod(len(items), self.world_size)
        start = self.rank * per_rank + min(self.rank, extra)
        return items[start : start + per_rank + (self.rank < extra)]

    def global_means(self, local: Mapping[str, torch.Tensor], n_rows: int) -> dict[str, torch.Tensor]:
        """Scalar means over this rank's `n_rows` rows -> means over every rank's rows: the value
        of the global mean, the gradient of this rank's share (n_rows / all rows) of it."""
        if not self.active:
            return dict(local)
        names = list(local)
        count = torch.tensor([float(n_rows)], dtype=torch.float64, device=local[names[0]].device)
        dist.all_reduce(count)
        share = n_rows / count[0]  # a tensor: no host sync inside the step
        shared = [local[name] * share.to(local[name].dtype) for name in names]
        # float64 sums: each rank's part then adds in the same order on every rank
        total = torch.stack([value.detach().double() for value in shared])
        dist.all_reduce(total)
        return {
            name: value + (total[index].to(value.dtype) - value).detach()
            for index, (name, value) in enumerate(zip(names, shared, strict=True))
        }

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce sum in place (of a tensor every rank holds with the same shape)."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Sum the trained parameters' gradients over the ranks (in one flat buffer per dtype); a
        parameter without a gradient on this rank counts as zero, so every rank reduces the same
        buffers."""
        if not self.active:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            by_dtype.setdefault(parameter.grad.dtype, []).append(parameter)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])  # type: ignore[union-attr]
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))  # type: ignore[union-attr]
                offset += n

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (e.g. BatchTopK's running threshold) on every rank."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (picklable), in rank order."""
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def check_same(self, what: str, value: Any) -> None:
        """Refuse a run whose ranks were given different `value`s (JSON-able)."""
        if not self.active:
            return
        text = json.dumps(value, sort_keys=True, default=str)
        texts = self.gather(text)
        differing = [rank for rank, other in enumerate(texts) if other != texts[0]]
        if differing:
            raise ValueError(
                f"The ranks of this distributed fine-tune were given different {what}: rank(s) "
                f"{differing} differ from rank 0. Launch every rank with the same SAE, data and "
                "settings."
            )

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launched_processes() -> int:
    """How many processes the launcher (torchrun) started for this job: 1 outside one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: str | None) -> str:
    """Join the torchrun job's process group (nccl on GPU, gloo on CPU) and return this rank's
    device: cuda:LOCAL_RANK on GPU."""
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not cuda:
        return device or "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return f"cuda:{local}"
