"""A run's resumable checkpoints: which one to resume from, what a resume must match, how many
are kept.

A checkpoint is SAELens's checkpoint folder (SAE weights and config, optimiser and scheduler
state) plus kl_finetune_state.json: the config, the tokens and sequences consumed, the L0
controller, and fingerprints of the starting SAE and the data, so a resume with another SAE or
other data is refused instead of silently continuing the wrong run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.constants import SAE_CFG_FILENAME, TRAINER_STATE_FILENAME
from safetensors import safe_open
from transformer_lens.hook_points import HookedRootModule

from sae_lens_kl.architectures import to_training_sae
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.data import DataSource, describe

if TYPE_CHECKING:
    from sae_lens_kl.plan import Plan

CHECKPOINTS_DIRNAME = "checkpoints"
FINETUNE_STATE_FILENAME = "kl_finetune_state.json"
# The options a resume may change: they decide where checkpoints go and how progress is logged,
# not the weights (checkpoint_suffix recomputes the same activations bit for bit; the world size
# is checked on its own). Every other option of KLFinetuneConfig must match the checkpoint's.
RESUME_MAY_CHANGE = (
    "checkpoint_every_tokens",
    "keep_checkpoints",
    "checkpoint_suffix",
    # compiled blocks change the results only by float rounding; None (decided by a probe) resumes
    # checkpoints written before it was the default (False)
    "compile_blocks",
    "device",
    "distributed",
    "eval_batch_size",
    "check_model_name",
    "log_to_wandb",
    "wandb_project",
    "wandb_log_frequency",
)
RESUME_MUST_MATCH = tuple(f.name for f in fields(KLFinetuneConfig) if f.name not in RESUME_MAY_CHANGE)


def sae_fingerprint(sae: SAE[Any]) -> str:
    """A short hash of the SAE's architecture, hook and every weight."""
    digest = hashlib.sha256()
    digest.update(
        f"{sae.cfg.architecture()}|{sae.cfg.metadata.hook_name}|{sae.cfg.d_in}|{sae.cfg.d_sae}".encode()
    )
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(data: DataSource) -> str:
    """A short hash naming the data: a token tensor's values, a local text file or folder's file
    names and sizes, a list's texts (or files' names and sizes), a Hugging Face dataset's own
    fingerprint, else its description."""
    digest = hashlib.sha256(describe(data).encode())
    if isinstance(data, torch.Tensor):
        digest.update(data.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    elif isinstance(data, (str, Path)) and Path(data).expanduser().exists():
        path = Path(data).expanduser()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                digest.update(
                    f"{file.relative_to(path) if path.is_dir() else file.name}:{file.stat().st_size}".encode()
                )
    elif isinstance(data, (list, tuple)):
        for item in data:  # texts, or files named with their sizes; each length-prefixed
            path = Path(item).expanduser() if isinstance(item, Path) else None
            text = f"{item}:{path.stat().st_size}" if path is not None and path.is_file() else str(item)
            digest.update(f"{len(text)}:{text}".encode())
    elif isinstance(getattr(data, "_fingerprint", None), str):
        # datasets 5.2 keeps a hash of a Dataset's content and transforms in the private
        # `_fingerprint` (tests/test_data.py fails if it goes or stops naming the content).
        digest.update(data._fingerprint.encode())
    return digest.hexdigest()[:16]


def checkpoint_tokens(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / FINETUNE_STATE_FILENAME).read_text())["training_tokens"])


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest readable checkpoint of a run folder. A damaged newer one
    (a killed write, a corrupt file) is skipped with a warning saying which and why."""
    if (path / FINETUNE_STATE_FILENAME).is_file():
        if problem := _unreadable(path):
            raise ValueError(f"resume_from={path} is a damaged checkpoint ({problem}); pass its run folder.")
        return path
    for _, candidate in _readable_checkpoints(path):
        return candidate
    raise FileNotFoundError(
        f"resume_from={path} holds no readable kl_finetune checkpoint (a folder with "
        f"{TRAINER_STATE_FILENAME} and {FINETUNE_STATE_FILENAME})."
    )


def common_checkpoints(run_folders: list[Path]) -> list[Path]:
    """For a run of several SAEs per pass (one run folder each), the newest checkpoint that every
    SAE reached: a run killed while writing one step's checkpoints resumes from the step before."""
    found = [dict(_readable_checkpoints(folder)) for folder in run_folders]
    common = set(found[0]).intersection(*found[1:])
    if not common:
        raise FileNotFoundError(
            f"resume_from: the SAEs' folders {[str(f) for f in run_folders]} hold no checkpoint at a "
            "token count they all reached; start the run again."
        )
    tokens = max(common)
    return [checkpoints[tokens] for checkpoints in found]


def _readable_checkpoints(path: Path) -> Iterator[tuple[int, Path]]:
    """(training tokens, folder) of the readable checkpoints in a run folder, newest first, checked
    as they are asked for; the damaged ones are skipped with a warning."""
    candidates = [
        state.parent
        for state in [
            *(path / CHECKPOINTS_DIRNAME).glob(f"*/{FINETUNE_STATE_FILENAME}"),
            *path.glob(f"*/{FINETUNE_STATE_FILENAME}"),
        ]
        # folders named .partial-* are checkpoints a killed run was still writing
        if not state.parent.name.startswith(".")
    ]
    by_recency: list[tuple[int, Path]] = []
    for candidate in candidates:
        try:
            by_recency.append((checkpoint_tokens(candidate), candidate))
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"Skipping checkpoint {candidate}: unreadable state ({error}).", stacklevel=3)
    for tokens, candidate in sorted(by_recency, reverse=True):
        if problem := _unreadable(candidate):
            warnings.warn(f"Skipping checkpoint {candidate}: {problem}; trying an older one.", stacklevel=3)
            continue
        yield tokens, candidate


def _unreadable(checkpoint: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None: every file it needs is there and
    parses (JSON, safetensors, the trainer state's archive checksums)."""
    try:
        json.loads((checkpoint / FINETUNE_STATE_FILENAME).read_text())["config"]
        json.loads((checkpoint / SAE_CFG_FILENAME).read_text())
        for file in sorted(checkpoint.glob("*.json")):  # activation_scaler.json and the like
            json.loads(file.read_text())
        weights = sorted(checkpoint.glob("*.safetensors"))
        if not weights:
            return "no weights file"
        for file in weights:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    handle.get_slice(key)
        with zipfile.ZipFile(checkpoint / TRAINER_STATE_FILENAME) as archive:  # torch.save's format
            if (damaged := archive.testzip()) is not None:
                return f"{TRAINER_STATE_FILENAME} is damaged ({damaged})"
    except Exception as error:  # noqa: BLE001 (any failure to read means: not this checkpoint)
        return f"{type(error).__name__}: {str(error)[:200]}"
    return None


_FINGERPRINTED = {
    "sae": "starting sae",
    "data": "starting data",
    "held_out": "held-out split (eval_data or not, or an evaluator), which decides the training sequences",
}


def check_resume(
    checkpoint: Path, cfg: KLFinetuneConfig, fingerprints: dict[str, str], world_size: int = 1
) -> None:
    """Refuse to resume with other settings, another starting SAE or other data than the run's,
    or with another number of processes."""
    state = json.loads((checkpoint / FINETUNE_STATE_FILENAME).read_text())
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was written by a run of {saved_world} process(es) "
            f"and this one has {world_size}. Resume with the same number (torchrun --nproc_per_node "
            f"{saved_world}{'' if saved_world > 1 else ', or without torchrun'})."
        )
    # a field newer than the checkpoint counts as its default (what that run used)
    defaults = {f.name: f.default for f in fields(KLFinetuneConfig)}
    saved = {**defaults, **state["config"]}
    current = cfg.to_dict()
    differing = [
        f"{n}: checkpoint {saved[n]!r} vs now {current[n]!r}"
        for n in RESUME_MUST_MATCH
        if saved[n] != current[n]
    ]
    saved_prints = state.get("fingerprints", {})
    differing += [
        f"the {_FINGERPRINTED[what]} (checkpoint {saved_prints[what]} vs now {fingerprints[what]})"
        for what in ("sae", "data", "held_out")
        if what in saved_prints and saved_prints[what] != fingerprints[what]
    ]
    if differing:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it differs in {'; '.join(differing)}. Resume with the "
            "original run's SAE, data and settings, or start a new run (overwrite=True)."
        )


def prune(checkpoints_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` intermediate checkpoints (final ones are kept)."""
    intermediate = sorted(
        (folder for folder in checkpoints_dir.iterdir() if folder.name.isdigit()), key=lambda f: int(f.name)
    )
    for folder in intermediate[: max(len(intermediate) - keep, 0)]:
        shutil.rmtree(folder, ignore_errors=True)


def starting_saes(
    saes: Sequence[SAE[Any]], plans: Sequence[Plan], model: HookedRootModule
) -> tuple[list[TrainingSAE[Any]], int]:
    """The training SAEs to start from (a resumed run's checkpoints) and the training sequences
    already consumed."""
    device = torch.device(plans[0].cfg.device) if plans[0].cfg.device else next(model.parameters()).device
    trainings, consumed = [], 0
    for sae, plan in zip(saes, plans, strict=True):
        if plan.checkpoint is not None:
            state = json.loads((plan.checkpoint / FINETUNE_STATE_FILENAME).read_text())
            consumed = state["train_sequences_consumed"]  # the same for every SAE of a run
            training = TrainingSAE.load_from_disk(plan.checkpoint, device=str(device))
            # safetensors hands back tensors at unaligned offsets of its buffer, where CPU kernels
            # (embedding_bag's per-sample-weight gradient, torch 2.13) round differently than on
            # fresh allocations: re-allocate, so a resumed run continues bit-identically
            with torch.no_grad():
                for tensor in [*training.parameters(), *training.buffers()]:
                    tensor.data = tensor.data.clone()
        else:
            training = to_training_sae(sae, plan.cfg.sparsity_coefficient).to(device)
        trainings.append(training)
    return trainings, consumed
