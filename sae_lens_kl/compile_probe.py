"""compile_blocks=None (the default): whether torch.compile'd blocks pay for this run, decided by
measurement.

The step runs every block but the SAE's without gradients (the prefix and the clean suffix) and
the blocks after the SAE's with gradients (the spliced suffix and its backward). The probe times
one block of the model, eagerly and through the compiled wrapper the run would use, in both grad
modes at the run's batch shape, and the first compiled calls (the compile). Compiling pays when
the step's blocks would run at least MIN_GAIN faster and the steps of the run save more time than
a compile costs. The timings are cached per model shape, batch shape, torch version, device and
thread count (`compile_probe.json` in the cache folder), so a model shape is probed once. With no
timings cached, a run too short to repay a compile is not probed: fewer than PROBE_MIN_STEPS
steps, or blocks that take under MIN_RUN_SECONDS in all (timed eagerly, no compile). An inductor
failure in the probe means eager and is not cached (it may pass). In a distributed run rank 0
probes and every rank follows it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from sae_lens_kl.checks import missing_compiler
from sae_lens_kl.models import cache_root
from sae_lens_kl.parallel import DataParallel
from sae_lens_kl.splice import CompiledBlocks, HookSite, frozen, supports_prefix_reuse

PROBE_MIN_STEPS = 200
"""Below this many steps a run cannot repay a compile on a CPU (~7 s per grad mode at the
GPT-2-small shape for ~0.2 s saved per step, docs/performance.md), so it is not probed."""

MIN_GAIN = 0.05
"""The smallest share of the step's block time compiling must save: below it, timing noise of a
few repeats could decide."""

MIN_RUN_SECONDS = 60.0
"""A run whose blocks take less than this in all, eagerly, is not probed: compiling could save
at most a few seconds of it, less than a compile costs (~7-20 s on CPU)."""

PROBE_REPEATS = 5
PROBE_FILE = "compile_probe.json"


@dataclass(frozen=True)
class BlockTimes:
    """One block's seconds at the run's batch shape, eager and compiled; `error` when inductor failed."""

    eager_forward: float
    eager_train: float
    """Forward with gradients plus the backward to the block's input."""
    compiled_forward: float | None
    """None when inductor failed (`error`)."""
    compiled_train: float | None
    compile_seconds: float
    """The first compiled calls' time beyond the eager ones: what each run pays again."""
    error: str | None = None


@dataclass(frozen=True)
class CompileDecision:
    """Whether this run compiles its blocks, and why (recorded in the run's report)."""

    compile: bool
    setting: str
    why: str
    probe: BlockTimes | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "compiled": self.compile,
            "setting": self.setting,
            "why": self.why,
            "probe": None if self.probe is None else asdict(self.probe),
        }


def probe_key(model: HookedTransformer, batch: int, seq: int) -> str:
    """What the timings depend on: torch, device, threads, the block's shape and the batch's."""
    cfg = model.cfg
    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return (
        f"torch {torch.__version__} | {device.type} {where} | threads {torch.get_num_threads()} | "
        f"{cfg.dtype} | d_model {cfg.d_model} d_mlp {cfg.d_mlp} heads {cfg.n_heads}/{cfg.n_key_value_heads} "
        f"d_head {cfg.d_head} {cfg.act_fn} {cfg.normalization_type} {cfg.positional_embedding_type} "
        f"gated {cfg.gated_mlp} {cfg.original_architecture} | batch {batch} x {seq}"
    )


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_cache(cache_file: Path) -> dict[str, Any]:
    """The cached probes; an unreadable file counts as empty (it is rewritten whole)."""
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        if device.type == "cuda":  # a GPU's kernels finish after the call returns
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _eager_seconds(model: HookedTransformer, batch: int, seq: int) -> tuple[float, float]:
    """One block's eager (forward, forward and backward) seconds: cheap, no compile."""
    forward, train, device = _block_runs(model, batch, seq)
    block = model.blocks[len(model.blocks) - 1]
    with frozen(model):
        _median_seconds(forward(block), 1, device)  # warm-ups
        _median_seconds(train(block), 1, device)
        return _median_seconds(forward(block), PROBE_REPEATS, device), _median_seconds(
            train(block), PROBE_REPEATS, device
        )


Runs = Callable[[Callable[..., torch.Tensor]], Callable[[], object]]


def _block_runs(model: HookedTransformer, batch: int, seq: int) -> tuple[Runs, Runs, torch.device]:
    """Makers of a block's forward (no gradients) and forward-and-backward on a random residual
    at the run's batch shape, with the LM's weights frozen as in the step."""
    cfg = model.cfg
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(0)
    residual = torch.randn(batch, seq, cfg.d_model, generator=generator, dtype=cfg.dtype).to(device)
    shortformer = torch.zeros_like(residual) if cfg.positional_embedding_type == "shortformer" else None

    def forward(block: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return block(residual, shortformer_pos_embed=shortformer)

        return run

    def train(block: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            start = residual.detach().requires_grad_(True)
            block(start, shortformer_pos_embed=shortformer).square().mean().backward()
            return start.grad

        return run

    return forward, train, device


def probe_block(
    model: HookedTransformer,
    blocks: CompiledBlocks,
    batch: int,
    seq: int,
    eager: tuple[float, float] | None = None,
) -> BlockTimes:
    """Times the model's last block eagerly (unless `eager` already holds its (forward, train)
    seconds) and through `blocks`' compiled wrapper."""
    eager_forward, eager_train = eager or _eager_seconds(model, batch, seq)
    forward, train, device = _block_runs(model, batch, seq)
    compiled = blocks.compiled[len(model.blocks) - 1]
    with frozen(model):  # the run's grad mode, so the probe compiles the run's own graphs
        try:
            first = _median_seconds(forward(compiled), 1, device) + _median_seconds(
                train(compiled), 1, device
            )
            compiled_forward = _median_seconds(forward(compiled), PROBE_REPEATS, device)
            compiled_train = _median_seconds(train(compiled), PROBE_REPEATS, device)
        except Exception as error:  # noqa: BLE001 (any inductor failure means: run eagerly)
            failure = f"{type(error).__name__}: {error}"
            return BlockTimes(eager_forward, eager_train, None, None, 0.0, failure)
    compile_seconds = max(first - compiled_forward - compiled_train, 0.0)
    return BlockTimes(eager_forward, eager_train, compiled_forward, compiled_train, compile_seconds)


def _cached_times(cache_file: Path, key: str) -> BlockTimes | None:
    try:
        return BlockTimes(**_read_cache(cache_file)[key])
    except (KeyError, TypeError):  # not probed yet, or by another version of this file
        return None


def cached_probe(
    model: HookedTransformer,
    blocks: CompiledBlocks,
    batch: int,
    seq: int,
    cache_file: Path,
    eager: tuple[float, float] | None = None,
) -> BlockTimes:
    """The cached timings of this model shape, else a new probe, cached unless inductor failed (a
    failure may be passing: out of memory, a toolchain being fixed) or the cache cannot be written."""
    key = probe_key(model, batch, seq)
    cached = _cached_times(cache_file, key)
    if cached is not None:
        return cached
    times = probe_block(model, blocks, batch, seq, eager)
    if times.error is None:
        _write_entry(cache_file, key, asdict(times))
    return times


def _write_entry(cache_file: Path, key: str, entry: dict[str, Any]) -> None:
    """Adds `entry` to the cache, written whole and renamed into place (a concurrent reader sees
    the old file or the new one); an unwritable cache folder is skipped, not an error."""
    temporary = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.")
        with os.fdopen(handle, "w") as file:
            json.dump({**_read_cache(cache_file), key: entry}, file, indent=1)
        os.replace(temporary, cache_file)
    except OSError:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)


def _blocks_per_step(forward: float, train: float, n_layers: int, start_layer: int) -> float:
    """Seconds of blocks in one online step: every block but the SAE's (which runs eagerly) once
    without gradients (the prefix, the clean suffix), the ones after it once more with gradients
    and their backward (the spliced suffix). An estimate: hooked blocks (LoRA on the LM, recorded
    downstream hooks) run eagerly, and a cached clean pass skips the prefix and clean suffix."""
    return (n_layers - 1) * forward + (n_layers - start_layer - 1) * train


def pays(times: BlockTimes, steps: int, n_layers: int, start_layer: int) -> tuple[bool, str]:
    """Whether compiling saves MIN_GAIN of the step's block time and more than its compile over
    `steps` steps, with the reason."""
    if times.error is not None or times.compiled_forward is None or times.compiled_train is None:
        return False, f"inductor failed in the probe ({times.error})"
    eager = _blocks_per_step(times.eager_forward, times.eager_train, n_layers, start_layer)
    compiled = _blocks_per_step(times.compiled_forward, times.compiled_train, n_layers, start_layer)
    saved = eager - compiled
    figures = (
        f"blocks {eager * 1e3:.1f} ms eager vs {compiled * 1e3:.1f} ms compiled per step, "
        f"compile {times.compile_seconds:.1f} s"
    )
    if saved < MIN_GAIN * eager:
        return False, f"saves under {MIN_GAIN:.0%} ({figures})"
    if saved * steps <= times.compile_seconds:
        return False, f"{steps} steps do not repay the compile ({figures})"
    return True, f"pays over {steps} steps ({figures})"


def decide(
    setting: bool | None,
    model: Any,
    site: HookSite,
    prefix_reuse: bool,
    batch: int,
    seq: int,
    steps: int,
    cache_file: Path | None = None,
    parallel: DataParallel | None = None,
) -> tuple[CompiledBlocks | None, CompileDecision]:
    """The compiled blocks this run uses (None: eager) and the decision for its report.
    `setting` True or False is the user's; make_plan already refused True where it cannot act.
    In a distributed run every rank follows rank 0's decision."""
    main = parallel is None or parallel.is_main
    decision, probed = (
        _decision(setting, model, site, prefix_reuse, (batch, seq, steps), cache_file)
        if main
        else (None, None)
    )
    if parallel is not None:
        decision = parallel.gather(decision)[0]
    assert decision is not None
    if not decision.compile:
        return None, decision
    # the probe's blocks carry its compiled graph; another rank compiles its own
    return probed or CompiledBlocks(model), decision


def _decision(
    setting: bool | None,
    model: Any,
    site: HookSite,
    prefix_reuse: bool,
    run: tuple[int, int, int],
    cache_file: Path | None,
) -> tuple[CompileDecision, CompiledBlocks | None]:
    """decide's decision on one process, and the compiled blocks its probe used (None when it did
    not probe); `run`: (batch, seq, steps)."""
    batch, seq, steps = run
    if setting is not None:
        return CompileDecision(setting, str(setting), "set by the caller"), None
    device = next(model.parameters()).device
    if not (
        isinstance(model, HookedTransformer)
        and prefix_reuse
        and supports_prefix_reuse(model, site)
        and model.cfg.n_devices == 1
    ):
        why = "compiling needs prefix reuse on a single-device HookedTransformer"
        return CompileDecision(False, "auto", why), None
    if missing := missing_compiler(device):
        return CompileDecision(False, "auto", f"inductor cannot run: {missing}"), None
    cache_file = cache_file or cache_root() / PROBE_FILE
    eager = None
    if _cached_times(cache_file, probe_key(model, batch, seq)) is None:
        if steps < PROBE_MIN_STEPS:
            why = f"{steps} steps: too short to probe (< {PROBE_MIN_STEPS})"
            return CompileDecision(False, "auto", why), None
        eager = _eager_seconds(model, batch, seq)
        run_seconds = steps * _blocks_per_step(*eager, model.cfg.n_layers, site.block or 0)
        if run_seconds < MIN_RUN_SECONDS:
            why = f"the run's blocks take ~{run_seconds:.0f} s eagerly: too short to repay a compile"
            return CompileDecision(False, "auto", why), None
    blocks = CompiledBlocks(model)
    times = cached_probe(model, blocks, batch, seq, cache_file, eager)
    compile_pays, why = pays(times, steps, model.cfg.n_layers, site.block or 0)
    return CompileDecision(compile_pays, "auto", why, times), blocks
