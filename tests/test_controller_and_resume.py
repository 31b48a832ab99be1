"""The L0 controller (paper App. E) and checkpoint/resume."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import SAE
from sae_lens.training.optim import CoefficientScheduler

from sae_lens_kl import KLFinetuneTrainer, kl_finetune
from sae_lens_kl.controller import SparsityController

SEQ = 16
DATA = random_tokens(120, seq=SEQ)
FAST = {"eval_tokens": 16 * SEQ, "batch_size": 4, "kl_chunk_tokens": 16}
STEP_TOKENS = 4 * SEQ


def test_controller_rule() -> None:
    scheduler = CoefficientScheduler(warm_up_steps=0, final_value=2.0)
    controller = SparsityController("l1", rate=0.001, target_l0=10.0)
    controller.update(scheduler, l0=12.0)  # too dense: penalise more
    assert scheduler.value == pytest.approx(2.0 * 1.001)
    controller.update(scheduler, l0=8.0)  # too sparse: penalise less
    assert scheduler.value == pytest.approx(2.0 * 1.001 * 0.999)
    assert scheduler.step() == pytest.approx(2.0 * 1.001 * 0.999)  # survives the scheduler's step


@pytest.mark.parametrize("direction", ["down", "up"])
def test_controller_moves_l0_toward_its_target(direction: str) -> None:
    model = tiny_model()
    sae = make_sae("standard")
    # An L1 coefficient strong enough to matter at this lr, so the controller's moves show in L0.
    options = {"tokens": 25 * STEP_TOKENS, "lr": 1e-2, "sparsity_coefficient": 0.3, **FAST}
    base = kl_finetune(sae, model, DATA, sparsity_controller="off", **options)
    l0_before = base.cfg.metadata.kl_finetune["before"]["l0"]
    target = l0_before * (0.5 if direction == "down" else 1.5)
    controlled = kl_finetune(sae, model, DATA, target_l0=target, controller_rate=0.2, **options)
    report = controlled.cfg.metadata.kl_finetune
    l0_free = base.cfg.metadata.kl_finetune["after"]["l0"]
    l0_controlled = report["after"]["l0"]
    coefficient = report["sparsity_controller"]["coefficient"]
    if direction == "down":
        assert l0_controlled < l0_free - 2 and coefficient > 0.3
    else:
        assert l0_controlled > l0_free + 2 and coefficient < 0.3
    assert abs(l0_controlled - target) < abs(l0_free - target)
    # the controlled coefficient is in the final config
    details = controlled.cfg.metadata.training_architecture_details
    assert details["l1_coefficient"] == pytest.approx(coefficient)


def test_controller_default_target_is_the_l0_before_fine_tuning() -> None:
    model = tiny_model()
    tuned = kl_finetune(make_sae("standard"), model, DATA, tokens=2 * STEP_TOKENS, lr=1e-3, **FAST)
    report = tuned.cfg.metadata.kl_finetune
    assert report["sparsity_controller"]["target_l0"] == pytest.approx(report["before"]["l0"])
    # TopK SAEs have no sparsity coefficient: 'auto' leaves them alone
    topk = kl_finetune(make_sae("topk"), model, DATA, tokens=2 * STEP_TOKENS, lr=1e-3, **FAST)
    assert "sparsity_controller" not in topk.cfg.metadata.kl_finetune


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "jumprelu_skip_transcoder"])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(architecture: str, tmp_path) -> None:
    model = tiny_model()
    sae = make_sae(architecture)
    options: dict[str, Any] = {
        "tokens": 8 * STEP_TOKENS,
        "lr": 2e-3,
        "checkpoint_every_tokens": 2 * STEP_TOKENS,
        "dead_feature_window": 2,  # makes TopK's dead-latent aux loss depend on restored statistics
        **FAST,
    }
    if architecture.startswith("jumprelu"):
        options["sparsity_controller"] = "on"
    whole = kl_finetune(sae, model, DATA, save_dir=tmp_path / "whole", **options)

    def crash_after_five_steps(trainer: KLFinetuneTrainer, output: Any) -> None:  # noqa: ARG001
        if trainer.n_training_steps == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        kl_finetune(
            sae,
            model,
            DATA,
            save_dir=tmp_path / "run",
            callbacks=[crash_after_five_steps],
            **options,
        )
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert not [name for name in checkpoints if name.startswith(".")]
    assert checkpoints == [str(2 * STEP_TOKENS), str(4 * STEP_TOKENS)]
    assert not (tmp_path / "run" / "cfg.json").exists()  # no final artifact from the killed run

    # A checkpoint the killed run was still writing is never resumed from.
    partial = tmp_path / "run" / "checkpoints" / ".partial-99999-x"
    partial.mkdir()
    last = tmp_path / "run" / "checkpoints" / str(4 * STEP_TOKENS) / "kl_finetune_state.json"
    (partial / "kl_finetune_state.json").write_text(
        json.dumps({**json.loads(last.read_text()), "training_tokens": 10**9})
    )
    resumed = kl_finetune(
        sae, model, DATA, save_dir=tmp_path / "run", resume_from=tmp_path / "run", **options
    )
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert resumed.cfg.metadata.kl_finetune["training_tokens"] == 8 * STEP_TOKENS
    if architecture != "topk":
        assert (
            resumed.cfg.metadata.kl_finetune["sparsity_controller"]
            == whole.cfg.metadata.kl_finetune["sparsity_controller"]
        )
        state = json.loads(
            (tmp_path / "run" / "checkpoints" / str(4 * STEP_TOKENS) / "kl_finetune_state.json").read_text()
        )
        # the controller had moved the coefficient (SAELens's default 1.0) by the checkpoint
        assert state["controller"]["coefficient"] != pytest.approx(1.0)
    loaded = SAE.load_from_disk(tmp_path / "run")
    assert torch.equal(loaded.W_dec, whole.W_dec)


def test_resume_with_different_settings_is_refused(tmp_path) -> None:
    model = tiny_model()
    sae = make_sae("topk")
    kl_finetune(sae, model, DATA, tokens=2 * STEP_TOKENS, lr=1e-3, save_dir=tmp_path / "run", **FAST)
    with pytest.raises(ValueError, match="lr: checkpoint 0.001 vs now 0.002"):
        kl_finetune(sae, model, DATA, tokens=2 * STEP_TOKENS, lr=2e-3, resume_from=tmp_path / "run", **FAST)
