"""compile_blocks=None: decided by a cached timed probe, eager when a run is too short or inductor
fails, and a compiled run stays equal to the eager one to float rounding."""

from __future__ import annotations

import json

import torch
from conftest import make_sae, random_tokens, tiny_model

from sae_lens_kl import kl_finetune
from sae_lens_kl.compile_probe import PROBE_FILE, PROBE_MIN_STEPS, BlockTimes, cached_probe, decide, pays
from sae_lens_kl.splice import CompiledBlocks, HookSite

SEQ = 16
DATA = random_tokens(96, seq=SEQ)
FAST = {"eval_tokens": 16 * SEQ, "batch_size": 4, "kl_chunk_tokens": 16}
HOOK = "blocks.0.hook_resid_post"


def times(eager: float, compiled: float, compile_seconds: float) -> BlockTimes:
    return BlockTimes(eager, 2 * eager, compiled, 2 * compiled, compile_seconds)


def test_compiling_pays_only_with_enough_gain_and_steps_to_repay_the_compile() -> None:
    # 4 layers, SAE in block 1: 3 blocks without gradients and 2 with them per step
    assert pays(times(0.010, 0.005, 1.0), steps=1000, n_layers=4, start_layer=1)[0]
    # the same saving per step (0.035 s) repays a 1 s compile over 1,000 steps, not over 20
    assert not pays(times(0.010, 0.005, 1.0), steps=20, n_layers=4, start_layer=1)[0]
    # under MIN_GAIN of the blocks' time: not worth the rounding differences, whatever the steps
    no_gain, why = pays(times(0.010, 0.0099, 0.0), steps=10**6, n_layers=4, start_layer=1)
    assert not no_gain and "saves under" in why
    failed = BlockTimes(0.01, 0.02, None, None, 0.0, "BackendCompilerFailed: boom")
    assert pays(failed, steps=10**6, n_layers=4, start_layer=1) == (
        False,
        "inductor failed in the probe (BackendCompilerFailed: boom)",
    )


def test_a_short_run_with_nothing_cached_runs_eagerly_without_probing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAE_LENS_KL_CACHE", str(tmp_path))
    model = tiny_model()
    auto = kl_finetune(make_sae("topk", hook_name=HOOK), model, DATA, tokens=3 * 4 * SEQ, lr=1e-3, **FAST)
    eager = kl_finetune(
        make_sae("topk", hook_name=HOOK),
        model,
        DATA,
        tokens=3 * 4 * SEQ,
        lr=1e-3,
        compile_blocks=False,
        **FAST,
    )
    decision = auto.cfg.metadata.kl_finetune["compile_blocks"]
    assert decision["setting"] == "auto" and not decision["compiled"]
    assert "too short to probe" in decision["why"]
    assert not (tmp_path / PROBE_FILE).exists()
    assert torch.equal(auto.W_dec, eager.W_dec) and torch.equal(auto.W_enc, eager.W_enc)


def test_the_probe_is_cached_and_its_timings_decide(tmp_path, monkeypatch) -> None:
    model = tiny_model()
    site = HookSite.for_model(model, HOOK, None)
    cache_file = tmp_path / PROBE_FILE
    torch._dynamo.reset()
    probed = cached_probe(model, CompiledBlocks(model), 4, SEQ, cache_file)
    assert probed.error is None and probed.compiled_forward is not None
    for seconds in (probed.eager_forward, probed.eager_train, probed.compiled_forward):
        assert 0 < seconds < 60
    cache = json.loads(cache_file.read_text())
    (key,) = cache
    assert BlockTimes(**cache[key]) == probed
    # the cache decides from now on: timings that make compiling pay after 3 steps compile 3 steps
    cache[key] = {**cache[key], "compiled_forward": 0.0, "compiled_train": 0.0, "compile_seconds": 0.0}
    cache_file.write_text(json.dumps(cache))
    blocks, cached = decide(None, model, site, True, 4, SEQ, 3, cache_file)
    assert blocks is not None and cached.compile and cached.probe == BlockTimes(**cache[key])

    monkeypatch.setenv("SAE_LENS_KL_CACHE", str(tmp_path))
    sae = make_sae("topk", hook_name=HOOK)
    compiled = kl_finetune(sae, model, DATA, tokens=3 * 4 * SEQ, lr=1e-3, **FAST)
    eager = kl_finetune(sae, model, DATA, tokens=3 * 4 * SEQ, lr=1e-3, compile_blocks=False, **FAST)
    assert compiled.cfg.metadata.kl_finetune["compile_blocks"]["compiled"]
    # compiled kernels reorder float32 sums: the tolerance of tests/test_compile.py
    for name in ("W_dec", "W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-4, atol=1e-6)
    assert not torch.equal(compiled.W_dec, sae.W_dec)


def test_a_run_whose_blocks_take_seconds_is_not_probed(tmp_path) -> None:
    model = tiny_model()
    site = HookSite.for_model(model, HOOK, None)
    blocks, decision = decide(None, model, site, True, 4, SEQ, 10 * PROBE_MIN_STEPS, tmp_path / PROBE_FILE)
    assert blocks is None and not decision.compile and decision.probe is None
    assert "too short to repay a compile" in decision.why
    assert not (tmp_path / PROBE_FILE).exists()


def test_an_inductor_failure_in_the_probe_means_eager_and_is_not_cached(tmp_path, monkeypatch) -> None:
    # a C++ compiler inductor cannot run, and caches that cannot hold this shape's kernels
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    broken = {"cpp.cxx": (None, str(tmp_path / "no-such-c++")), "fx_graph_cache": False}
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(broken):
            model = tiny_model()
            times = cached_probe(model, CompiledBlocks(model), 3, 11, tmp_path / PROBE_FILE)
    finally:
        torch._dynamo.reset()
    assert times.error is not None and times.compiled_forward is None
    assert not (tmp_path / PROBE_FILE).exists()
    compile_pays, why = pays(times, steps=10**6, n_layers=2, start_layer=0)
    assert not compile_pays and why.startswith("inductor failed in the probe")


def test_an_unwritable_cache_folder_only_loses_the_cache(tmp_path) -> None:
    not_a_folder = tmp_path / "a_file"  # unwritable even for root: its "folder" is a file
    not_a_folder.write_text("")
    model = tiny_model()
    times = cached_probe(model, CompiledBlocks(model), 4, SEQ, not_a_folder / PROBE_FILE)
    assert times.error is None and not_a_folder.read_text() == ""
    assert [path.name for path in tmp_path.iterdir()] == ["a_file"]  # no temporary file left


def test_the_callers_setting_is_kept() -> None:
    model = tiny_model()
    site = HookSite.for_model(model, HOOK, None)
    blocks, decision = decide(False, model, site, True, 4, SEQ, 10**6)
    assert blocks is None and decision.as_dict()["setting"] == "False"


def test_no_compiler_means_eager_without_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAE_LENS_KL_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "")  # no g++/clang++ to be found, as on a bare machine
    tuned = kl_finetune(make_sae("topk", hook_name=HOOK), tiny_model(), DATA, tokens=2 * 4 * SEQ, **FAST)
    decision = tuned.cfg.metadata.kl_finetune["compile_blocks"]
    assert not decision["compiled"] and "no C++ compiler" in decision["why"]
