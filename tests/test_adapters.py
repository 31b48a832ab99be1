"""Adapters after the SAE (paper App. C): identity at the start, trained with the SAE frozen,
saved beside the SAE and re-attached, applied wherever the SAE runs, resumable, bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import SAE, HookedSAETransformer

from sae_lens_kl import KLFinetuneTrainer, kl_finetune
from sae_lens_kl.adapters import ADAPTER_FILENAME, Adapter, attached, load_adapter

SEQ = 16
DATA = random_tokens(60, seq=SEQ)
STEP_TOKENS = 4 * SEQ
OPTIONS = {"tokens": 6 * STEP_TOKENS, "batch_size": 4, "eval_tokens": 8 * SEQ, "lr": 5e-3}
HOOK = "blocks.1.hook_resid_pre"  # make_sae's hook


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_an_adapter_starts_as_the_identity(kind: str) -> None:
    sae = make_sae("topk")
    x = torch.randn(20, sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    plain = sae(x)
    adapter = Adapter(kind, sae.cfg.d_in, 8).attach(sae)  # type: ignore[arg-type]
    assert attached(sae) is adapter
    assert torch.equal(sae(x), plain)  # the zero-initialised part makes f(x) exactly 0
    with torch.no_grad():
        next(p for n, p in adapter.named_parameters() if n in ("U", "W2")).normal_()
    assert not torch.equal(sae(x), plain)
    adapter.detach(sae)
    assert attached(sae) is None and torch.equal(sae(x), plain)


@pytest.mark.parametrize(("kind", "architecture"), [("linear", "topk"), ("mlp", "standard")])
def test_an_adapter_trains_with_the_sae_frozen_and_reloads(kind: str, architecture: str, tmp_path) -> None:
    model, sae = tiny_model(), make_sae(architecture)
    model_before, sae_before = weights(model), weights(sae)
    tuned = kl_finetune(sae, model, DATA, adapter=kind, adapter_width=4, save_dir=tmp_path / "out", **OPTIONS)
    # The SAE is the starting one, bit for bit; only the adapter trained; the LM is untouched.
    assert all(torch.equal(tuned.state_dict()[n], t) for n, t in sae_before.items())
    assert all(torch.equal(model.state_dict()[n], t) for n, t in model_before.items())
    adapter = attached(tuned)
    assert adapter is not None and adapter.kind == kind
    assert any(p.abs().sum() > 0 for n, p in adapter.named_parameters() if n in ("V", "W2"))
    report = tuned.cfg.metadata.kl_finetune
    assert report["after"]["kl"] < report["before"]["kl"]

    # Saved beside a plain SAELens artifact; load_adapter re-attaches it.
    out = tmp_path / "out"
    assert (out / ADAPTER_FILENAME).is_file()
    reloaded = SAE.load_from_disk(out)
    x = torch.randn(20, sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(reloaded(x), tuned(x))  # the adapter is not part of the SAE's weights
    load_adapter(out, reloaded)
    assert torch.equal(reloaded(x), tuned(x))

    # HookedSAETransformer splices the adapted reconstruction, as the fine-tune's step did.
    hooked = HookedSAETransformer(model.cfg)
    hooked.load_state_dict(model.state_dict())
    tokens = DATA[:2]
    with_adapter = hooked.run_with_saes(tokens, saes=[reloaded])
    by_hand = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda acts, hook: adapter(sae(acts)))])  # noqa: ARG005
    torch.testing.assert_close(with_adapter, by_hand, rtol=0, atol=0)
    adapter_of_reloaded = attached(reloaded)
    assert adapter_of_reloaded is not None
    adapter_of_reloaded.detach(reloaded)
    assert not torch.equal(hooked.run_with_saes(tokens, saes=[reloaded]), with_adapter)


def test_two_stage_fine_tune_then_adapter() -> None:
    model = tiny_model()
    stage_one = kl_finetune(make_sae("topk"), model, DATA, **OPTIONS)
    stage_two = kl_finetune(stage_one, model, DATA, adapter="linear", adapter_width=4, **OPTIONS)
    assert torch.equal(stage_two.W_dec, stage_one.W_dec) and attached(stage_two) is not None
    report = stage_two.cfg.metadata.kl_finetune
    assert report["before"]["kl"] == pytest.approx(stage_one.cfg.metadata.kl_finetune["after"]["kl"])
    assert report["after"]["kl"] < report["before"]["kl"]


def test_a_run_with_an_adapter_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    class Crash(RuntimeError):
        pass

    def crash_at_3(trainer: KLFinetuneTrainer, output: Any) -> None:  # noqa: ARG001
        if trainer.n_training_steps == 3:
            raise Crash

    options = {**OPTIONS, "adapter": "mlp", "adapter_width": 4, "checkpoint_every_tokens": STEP_TOKENS}
    sae = make_sae("topk")
    with pytest.raises(Crash):
        kl_finetune(sae, tiny_model(), DATA, save_dir=tmp_path / "out", callbacks=[crash_at_3], **options)
    resumed = kl_finetune(
        sae, tiny_model(), DATA, save_dir=tmp_path / "out", resume_from=tmp_path / "out", **options
    )
    uninterrupted = kl_finetune(sae, tiny_model(), DATA, **options)
    for name, tensor in weights(attached(uninterrupted)).items():  # type: ignore[arg-type]
        assert torch.equal(weights(attached(resumed))[name], tensor), name  # type: ignore[arg-type]


def test_several_saes_with_adapters_equal_each_alone() -> None:
    options = {**OPTIONS, "adapter": "linear", "adapter_width": 4}
    saes = [make_sae("topk", seed=1), make_sae("topk", seed=2)]
    together = kl_finetune(saes, tiny_model(), DATA, **options)
    for sae, tuned in zip(saes, together, strict=True):
        alone = kl_finetune(sae, tiny_model(), DATA, **options)
        assert torch.equal(attached(tuned).U, attached(alone).U)  # type: ignore[union-attr]


def test_adapter_bad_input(tmp_path) -> None:
    model, options = tiny_model(), {"tokens": STEP_TOKENS, "batch_size": 4, "eval_tokens": 0}
    with pytest.raises(ValueError, match="adapter='conv' is not one of"):
        kl_finetune(make_sae("topk"), model, DATA, adapter="conv", **options)
    with pytest.raises(ValueError, match="adapter_width=0 must be a positive integer"):
        kl_finetune(make_sae("topk"), model, DATA, adapter="linear", adapter_width=0, **options)
    with pytest.raises(ValueError, match="adapter_width=32 must be below the SAE's d_in"):
        kl_finetune(make_sae("topk"), model, DATA, adapter="linear", adapter_width=32, **options)
    with pytest.raises(ValueError, match="adapter and sae_lora_rank both set"):
        kl_finetune(make_sae("topk"), model, DATA, adapter="linear", sae_lora_rank=2, **options)
    sae = make_sae("topk")
    Adapter("linear", sae.cfg.d_in, 4).attach(sae)
    with pytest.raises(ValueError, match="This SAE has an adapter attached"):
        kl_finetune(sae, model, DATA, **options)
    with pytest.raises(ValueError, match="already has an adapter attached"):
        Adapter("mlp", sae.cfg.d_in, 4).attach(sae)
    with pytest.raises(FileNotFoundError, match="No adapter at"):
        load_adapter(tmp_path, make_sae("topk"))
    Adapter("linear", 32, 4).save(tmp_path / ADAPTER_FILENAME)
    with pytest.raises(ValueError, match="maps 32-dimensional reconstructions; this SAE's are 16"):
        load_adapter(tmp_path, make_sae("topk", d_in=16))


def test_the_adapter_follows_the_same_lr_schedule_as_the_sae() -> None:
    lrs: list[list[float]] = []

    def record(trainer: KLFinetuneTrainer, output: Any) -> None:  # noqa: ARG001
        lrs.append([group["lr"] for group in trainer.optimizer.param_groups])

    kl_finetune(
        make_sae("topk"), tiny_model(), DATA, adapter="linear", adapter_width=4, callbacks=[record], **OPTIONS
    )
    assert all(len(step) == 2 and step[0] == step[1] for step in lrs)  # SAE group, adapter group
    steps = OPTIONS["tokens"] // STEP_TOKENS
    # linear decay to 0 over the run (the default schedule), read after each step
    assert [step[1] for step in lrs] == pytest.approx(
        [OPTIONS["lr"] * (1 - (i + 1) / steps) for i in range(steps)]
    )


def test_adapters_start_as_the_papers_code_does() -> None:
    from sae_lens_kl.adapters import Adapter

    linear = Adapter("linear", 32, 4)
    assert torch.all(linear.U == 0)  # the up projection is the zero one (the released code)
    assert 0 < linear.V.abs().max() <= 1 / 32**0.5  # the down projection as nn.Linear's init
    mlp = Adapter("mlp", 32, 4)
    assert torch.all(mlp.W2 == 0) and torch.all(mlp.b2 == 0) and mlp.W1.abs().max() > 0
    x = torch.randn(5, 32)
    assert torch.equal(linear(x), x) and torch.equal(mlp(x), x)
