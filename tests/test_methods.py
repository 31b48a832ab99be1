"""Braun et al. 2024's objectives (e2e, e2e+ds): parity with their own package, the downstream
term recorded through the same splice, and bad input."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import clean_and_spliced_at, make_sae, random_tokens, tiny_model
from sae_lens import SAE
from sae_lens.saes.sae import TrainStepOutput

from sae_lens_kl import KLFinetuneTrainer, kl_finetune
from sae_lens_kl.cache import build_cache
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.losses import DownstreamMSETerm, KLTerm, StepTensors, objective_of
from sae_lens_kl.methods import METHODS, MethodEntry, SAEFinetune
from sae_lens_kl.stability import weight_stability
from sae_lens_kl.vocab import VocabProjection

SEQ = 16
DATA = random_tokens(40, seq=SEQ)
HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture
def braun_losses(monkeypatch) -> Any:
    """e2e_sae.losses from the e2e-sae 2.1.1 wheel. Its package __init__ imports a script the
    wheel does not ship, so the package is registered empty and the losses module imported alone."""
    spec = importlib.util.find_spec("e2e_sae")
    assert spec is not None and spec.submodule_search_locations, (
        "install with: pip install --no-deps e2e-sae==2.1.1"
    )
    package = types.ModuleType("e2e_sae")
    package.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, "e2e_sae", package)
    for name in [name for name in sys.modules if name.startswith("e2e_sae.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("e2e_sae.losses")


def step_tensors(clean_logits: torch.Tensor, spliced_logits: torch.Tensor, **recorded: Any) -> StepTensors:
    output = TrainStepOutput(
        sae_in=torch.zeros(1), sae_out=torch.zeros(1), feature_acts=torch.zeros(1), hidden_pre=torch.zeros(1),
        loss=torch.zeros(()), losses={}, metrics={},
    )  # fmt: skip
    identity = VocabProjection(None, None, 0.0)  # run outputs are the logits themselves
    return StepTensors(output, clean_logits, spliced_logits, identity, chunk_tokens=7, **recorded)


def test_kl_and_downstream_terms_equal_braun_et_al(braun_losses) -> None:
    # Compared in float64: the same formulas in a different order agree to ~1e-15.
    generator = torch.Generator().manual_seed(0)
    clean, spliced = (torch.randn(24, 50, generator=generator, dtype=torch.float64) * 3 for _ in range(2))
    hooks = ("blocks.2.hook_resid_post", "blocks.3.hook_resid_post")
    clean_at = {hook: torch.randn(24, 16, generator=generator, dtype=torch.float64) for hook in hooks}
    spliced_at = {
        hook: clean_at[hook] + 0.1 * torch.randn(24, 16, generator=generator, dtype=torch.float64)
        for hook in hooks
    }
    tensors = step_tensors(clean, spliced, clean_at=clean_at, spliced_at=spliced_at)

    theirs_kl = braun_losses.LogitsKLLoss(coeff=0.5).calc_loss(new_logits=spliced, orig_logits=clean)
    torch.testing.assert_close(KLTerm()(tensors), theirs_kl, rtol=1e-12, atol=0)

    in_to_orig = braun_losses.InToOrigLoss(total_coeff=2.5, hook_positions=list(hooks))
    theirs_ds = sum(in_to_orig.coeff * in_to_orig.calc_loss(spliced_at[h], clean_at[h]) for h in hooks)
    ours_ds = 2.5 * DownstreamMSETerm(hooks)(tensors)
    torch.testing.assert_close(ours_ds, theirs_ds, rtol=1e-12, atol=0)

    # the whole objective: 0.5 * KL + in_to_orig, as Braun et al. sum them (aux = 0 here)
    cfg = KLFinetuneConfig(
        tokens=1, loss="e2e+ds", kl_coefficient=0.5, downstream_hooks=list(hooks), downstream_coefficient=2.5
    )
    loss, _ = objective_of(cfg).combine(
        {"kl": KLTerm()(tensors), "downstream_mse": DownstreamMSETerm(hooks)(tensors)},
        torch.zeros((), dtype=torch.float64),
        sae_mse=torch.ones((), dtype=torch.float64),
    )
    torch.testing.assert_close(loss, 0.5 * theirs_kl + theirs_ds, rtol=1e-12, atol=0)


def test_the_downstream_term_is_measured_on_the_spliced_run() -> None:
    # The first step's downstream MSE, recomputed with plain run_with_hooks from the SAE the
    # fine-tune starts from (float64: only rounding separates the two).
    model = tiny_model(dtype=torch.float64)
    sae = make_sae("topk", dtype="float64")
    seen: list[float] = []

    def first_step(trainer: KLFinetuneTrainer, output: TrainStepOutput) -> None:
        if trainer.n_training_steps == 1:
            seen.append(float(output.losses["downstream_mse_loss"]))

    tuned = kl_finetune(
        sae,
        model,
        DATA,
        tokens=2 * 4 * SEQ,
        batch_size=4,
        eval_tokens=0,
        loss="e2e+ds",
        callbacks=[first_step],
    )
    hooks = tuned.cfg.metadata.kl_finetune["config"]["downstream_hooks"]
    assert hooks == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    tokens = DATA[:4]
    clean, spliced = clean_and_spliced_at(model, tokens, HOOK, sae, hooks)
    expected = torch.stack([F.mse_loss(spliced[h], clean[h]) for h in hooks]).mean().item()
    assert seen == [pytest.approx(expected, rel=1e-9)]


def test_e2e_ds_trains_differently_from_e2e() -> None:
    model, sae = tiny_model(), make_sae("topk")
    options = {"tokens": 4 * 4 * SEQ, "batch_size": 4, "eval_tokens": 0, "lr": 2e-3}
    e2e = kl_finetune(sae, model, DATA, loss="e2e", **options)
    kl_only = kl_finetune(sae, model, DATA, loss="kl", **options)
    with_ds = kl_finetune(sae, model, DATA, loss="e2e+ds", **options)
    assert torch.equal(e2e.W_dec, kl_only.W_dec)  # Braun's e2e is KL + the SAE's sparsity loss
    assert not torch.equal(e2e.W_dec, with_ds.W_dec)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"loss": "e2e+ds", "downstream_hooks": ["blocks.0.hook_resid_post"]},
            "does not come after the SAE's hook",
        ),
        (
            {"loss": "e2e+ds", "downstream_hooks": ["blocks.9.hook_resid_post"]},
            "'blocks.9.hook_resid_post' does not exist",
        ),
        ({"loss": "kl", "downstream_hooks": ["blocks.2.hook_resid_post"]}, "apply to loss='e2e\\+ds' only"),
    ],
)
def test_downstream_hooks_bad_input(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kl_finetune(
            make_sae("topk"), tiny_model(), DATA, tokens=4 * SEQ, batch_size=4, eval_tokens=0, **options
        )


def test_downstream_loss_bad_input(tmp_path) -> None:
    model = tiny_model()
    options = {"tokens": 4 * SEQ, "batch_size": 4, "eval_tokens": 0}
    with pytest.raises(ValueError, match="one SAE at a time"):
        kl_finetune([make_sae("topk"), make_sae("topk", seed=2)], model, DATA, loss="e2e+ds", **options)
    cache = build_cache(
        model, DATA, HOOK, tmp_path / "cache", tokens=20 * SEQ, context_size=SEQ, prepend_bos=False
    )
    with pytest.raises(ValueError, match="clean-pass cache does not store"):
        kl_finetune(make_sae("topk"), model, cache, loss="e2e+ds", **options)


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_lr_schedule(schedule: str) -> None:
    lrs: list[float] = []

    def record(trainer: KLFinetuneTrainer, output: TrainStepOutput) -> None:  # noqa: ARG001
        lrs.append(trainer.optimizer.param_groups[0]["lr"])

    kl_finetune(
        make_sae("topk"), tiny_model(), DATA, tokens=4 * 4 * SEQ, batch_size=4, eval_tokens=0,
        lr=1e-3, lr_schedule=schedule, callbacks=[record],
    )  # fmt: skip
    # a callback runs after the scheduler's step: it sees the lr the next step will use
    if schedule == "constant":
        assert lrs == [1e-3] * 4
    else:
        assert lrs == pytest.approx([1e-3 * (1 - step / 4) for step in range(1, 5)])


def test_weight_stability() -> None:
    sae = make_sae("standard")
    same = weight_stability(sae, sae)
    assert same == {
        part: {"p25": pytest.approx(1.0), "p50": pytest.approx(1.0), "p75": pytest.approx(1.0)}
        for part in ("encoder", "decoder")
    }
    flipped = make_sae("standard")
    with torch.no_grad():
        flipped.W_dec[::2] *= -1  # half the latents' decoder vectors point the other way
    assert weight_stability(sae, flipped)["decoder"] == {"p25": -1.0, "p50": pytest.approx(0.0), "p75": 1.0}
    tuned = kl_finetune(sae, tiny_model(), DATA, tokens=4 * 4 * SEQ, batch_size=4, eval_tokens=0, lr=2e-3)
    moved = tuned.cfg.metadata.kl_finetune["weight_stability"]
    assert all(0 < moved[part]["p50"] < 1 for part in ("encoder", "decoder"))
    with pytest.raises(ValueError, match="one shape"):
        weight_stability(sae, make_sae("standard", d_sae=48))


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_lora_on_the_sae_trains_a_low_rank_update_and_merges_it(architecture: str, tmp_path) -> None:
    sae = make_sae(architecture)
    options = {"tokens": 6 * 4 * SEQ, "batch_size": 4, "eval_tokens": 8 * SEQ, "lr": 5e-3}
    tuned = kl_finetune(
        sae,
        tiny_model(),
        DATA,
        sae_lora_rank=2,
        save_dir=tmp_path / "out",
        checkpoint_every_tokens=2 * 4 * SEQ,
        **options,
    )
    assert type(tuned) is type(sae) and tuned.cfg.architecture() == architecture
    assert torch.equal(SAE.load_from_disk(tmp_path / "out").W_dec, tuned.W_dec)
    for name in ("W_enc", "W_dec"):
        start = getattr(sae, name).detach().double()
        update = getattr(tuned, name).detach().double() - start
        # The merge W0 + (alpha/r) A B rounds in float32: an error matrix E with |E_ij| <= u32 |W0_ij|, so
        # ||E||_2 <= u32 ||W0||_F. Singular values above twice that are the update's own.
        rounding = 2 * 2**-24 * start.norm()
        assert torch.linalg.matrix_rank(update, atol=rounding) == 2, name  # moved, in a rank-2 subspace
    for name in ("b_enc", "b_dec"):
        assert torch.equal(getattr(tuned, name), getattr(sae, name)), name
    report = tuned.cfg.metadata.kl_finetune
    assert report["after"]["kl"] < report["before"]["kl"]


def test_merged_lora_computes_what_the_unmerged_did() -> None:
    from sae_lens_kl.architectures import to_training_sae
    from sae_lens_kl.lora import add_lora, merge_lora

    training = to_training_sae(make_sae("standard"))
    add_lora(training, 3)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    before_training = training.decode(training.encode(x))
    with torch.no_grad():  # as if trained: a non-zero update
        for name in ("W_enc", "W_dec"):
            training.parametrizations[name][0].B.normal_(0, 0.01)
    unmerged = training.decode(training.encode(x))
    merge_lora(training)
    assert not torch.equal(unmerged, before_training)
    assert torch.equal(training.decode(training.encode(x)), unmerged)
    assert {name for name, _ in training.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec"}


def test_lora_rank_bad_input(tmp_path) -> None:
    options = {"tokens": 4 * SEQ, "batch_size": 4, "eval_tokens": 0}
    with pytest.raises(ValueError, match="sae_lora_rank=0 must be a positive integer"):
        kl_finetune(make_sae("topk"), tiny_model(), DATA, sae_lora_rank=0, **options)
    with pytest.raises(ValueError, match=r"sae_lora_rank=32 must lie in \(0, 32\)"):
        kl_finetune(make_sae("topk"), tiny_model(), DATA, sae_lora_rank=32, **options)
    with pytest.raises(ValueError, match="resume_from with sae_lora_rank"):
        kl_finetune(make_sae("topk"), tiny_model(), DATA, sae_lora_rank=2, resume_from=tmp_path, **options)


def test_lora_on_the_sae_is_pefts_lora_of_the_same_linear_map() -> None:
    # peft is installed by .ci/run (--no-deps); the paper's code applies it to the SAE's
    # encoder and decoder as nn.Linear layers with LoraConfig(lora_alpha=32)
    peft = pytest.importorskip("peft", reason="pip install --no-deps peft==0.21.2")
    from sae_lens_kl.architectures import to_training_sae
    from sae_lens_kl.lora import add_lora

    training = to_training_sae(make_sae("standard"))
    rank, alpha = 2, 32.0
    add_lora(training, rank, alpha)
    for name, (d_in, d_out) in {"W_enc": (32, 96), "W_dec": (96, 32)}.items():
        update = training.parametrizations[name][0]
        assert torch.all(update.B == 0)  # peft's lora_B: zeros, so nothing changes at first
        assert update.A.abs().max() <= 1 / d_in**0.5  # peft's lora_A: Kaiming-uniform over in
        with torch.no_grad():
            update.B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        linear = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(training.parametrizations[name].original.T)
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0)
        wrapped = peft.get_peft_model(torch.nn.Sequential(linear), config)
        layer = wrapped.base_model.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(update.A.T)
            layer.lora_B["default"].weight.copy_(update.B.T)
        inputs = torch.randn(10, d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        weight = getattr(training, name)  # W0 + (alpha/r) A B, formed in float32
        ours, theirs = inputs @ weight.double(), wrapped(inputs)
        # float32 rounding of the merged weight: the rank-r product (gamma_r), its scaling and the
        # sum with W0 each round once, so |W - W_exact| <= 4 u32 (|W0| + (alpha/r) |A| |B|)
        original = training.parametrizations[name].original.double()
        magnitude = original.abs() + update.scale * (update.A.double().abs() @ update.B.double().abs())
        bound = 4 * 2**-24 * (inputs.abs() @ magnitude)
        assert torch.all((ours - theirs).abs() <= bound), name


def unit_rows(sae):
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
    return sae


def test_decoder_rows_stay_at_unit_norm_as_in_the_papers_fine_tune() -> None:
    options = {"tokens": 4 * 4 * SEQ, "batch_size": 4, "eval_tokens": 0, "lr": 1e-2, "kl_chunk_tokens": 16}
    kept = kl_finetune(unit_rows(make_sae("topk")), tiny_model(), DATA, **options)  # default: on
    assert kept.cfg.metadata.kl_finetune["config"]["decoder_unit_norm"] is True
    # one division per row: |norm - 1| within a few float32 roundings of the d_in-term norm
    assert torch.allclose(
        kept.W_dec.double().norm(dim=-1), torch.ones(96, dtype=torch.float64), atol=32 * 2**-24
    )
    free = kl_finetune(unit_rows(make_sae("topk")), tiny_model(), DATA, decoder_unit_norm=False, **options)
    assert (free.W_dec.double().norm(dim=-1) - 1).abs().max() > 1e-3  # without it, rows scale
    assert not torch.allclose(kept.W_dec, unit_rows(make_sae("topk")).W_dec)  # they did turn
    with pytest.raises(ValueError, match="renormalising them would change what the SAE computes"):
        kl_finetune(make_sae("topk"), tiny_model(), DATA, decoder_unit_norm=True, **options)
    assert (
        kl_finetune(make_sae("topk"), tiny_model(), DATA, **options).cfg.metadata.kl_finetune["config"][
            "decoder_unit_norm"
        ]
        is False
    )  # rows that carry scale: off by default


def test_a_new_method_is_a_class_and_a_registry_entry(monkeypatch) -> None:
    # A toy method, declared here as a new module would: only the decoder bias trains. Registering
    # it makes kl_finetune(method=...) train it through the same step, plan, save and report.
    @dataclass
    class DecoderBiasOnly(SAEFinetune):
        trains_sae: bool = False  # no L0 controller on a frozen encoder

        def start(self, sae: Any, checkpoint: Any) -> list:  # noqa: ARG002
            sae.requires_grad_(False)
            sae.b_dec.requires_grad_(True)
            return []

    monkeypatch.setitem(METHODS, "decoder_bias", MethodEntry(lambda cfg, model, hook: DecoderBiasOnly()))  # noqa: ARG005
    sae = make_sae("topk")
    options = {"tokens": 4 * 4 * SEQ, "batch_size": 4, "eval_tokens": 0, "lr": 1e-2}
    tuned = kl_finetune(sae, tiny_model(), DATA, method="decoder_bias", **options)
    changed = {
        name for name, tensor in tuned.state_dict().items() if not torch.equal(tensor, sae.state_dict()[name])
    }
    assert changed == {"b_dec"}
    with pytest.raises(ValueError, match="not one of"):
        kl_finetune(sae, tiny_model(), DATA, method="no-such-method", **options)
    with pytest.raises(ValueError, match="options of"):
        kl_finetune(sae, tiny_model(), DATA, method="sae", adapter="linear", **options)
