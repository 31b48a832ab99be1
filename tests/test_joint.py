"""A transcoder set fine-tuned jointly as one replacement model (replacement="joint")."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_sae, random_tokens, tiny_model

from sae_lens_kl import kl_finetune
from sae_lens_kl.architectures import to_training_sae
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.joint import JointMemberTrainer, JointReplacementStep
from sae_lens_kl.runs import SpliceRunner, shared_clean_runs
from sae_lens_kl.splice import sae_sites

SEQ = 16
DATA = random_tokens(40, seq=SEQ)
OPTIONS = {"tokens": 4 * 4 * SEQ, "batch_size": 4, "lr": 2e-3, "eval_tokens": 8 * SEQ, "kl_chunk_tokens": 16}


def transcoder_set(dtype: torch.dtype = torch.float32, layers: range = range(3)) -> list:
    return [
        make_sae("transcoder", hook_name=f"blocks.{layer}.ln2.hook_normalized", seed=layer + 1).to(dtype)
        for layer in layers
    ]


def test_the_joint_step_takes_the_replacement_models_gradient() -> None:
    # The gradient each transcoder receives in one joint step, against plain autograd through a
    # run_with_hooks of the replacement model with the same loss, Σ 0.5 (MSE_i + α_i KL), all in
    # float64 (L1 coefficient 0: no sparsity term). Rounding only: ~1e-16 relative per operation.
    model = tiny_model(dtype=torch.float64)
    starts = transcoder_set(torch.float64)
    cfg = KLFinetuneConfig(tokens=4 * SEQ, batch_size=4, context_size=SEQ, sparsity_coefficient=0.0)
    trainers = {}
    for index, start in enumerate(starts):
        site, write = sae_sites(model, start)
        runner = SpliceRunner(model, site, write_site=write)
        trainers[f"sae_{index}"] = JointMemberTrainer(
            to_training_sae(start, 0.0), runner, iter(()), cfg, context_size=SEQ
        )
    joint = JointReplacementStep(trainers)
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def record(sae: object, name: str) -> None:
        seen[name] = {key: p.grad.clone() for key, p in sae.named_parameters()}  # type: ignore[attr-defined]

    for name, trainer in trainers.items():
        trainer._optimizer_step = functools.partial(record, name=name)  # type: ignore[method-assign]
    tokens = DATA[:4]
    runs = next(shared_clean_runs(model, iter([tokens]), {name: t.runner for name, t in trainers.items()}))
    joint._step(runs)

    copies = [to_training_sae(start, 0.0) for start in starts]
    inputs: dict[int, torch.Tensor] = {}
    targets: dict[int, torch.Tensor] = {}

    def clean_target(acts: torch.Tensor, hook: object, index: int) -> None:  # noqa: ARG001
        targets[index] = acts.detach()

    def read(acts: torch.Tensor, hook: object, index: int) -> None:  # noqa: ARG001
        inputs[index] = acts

    def write(acts: torch.Tensor, hook: object, index: int) -> torch.Tensor:  # noqa: ARG001
        return copies[index](inputs[index])

    outs = [(s.cfg.metadata.hook_name, s.cfg.metadata.hook_name_out) for s in starts]
    with torch.no_grad():
        log_p = model.run_with_hooks(
            tokens, fwd_hooks=[(o, functools.partial(clean_target, index=i)) for i, (_, o) in enumerate(outs)]
        ).log_softmax(-1)
    hooks = [(h, functools.partial(read, index=i)) for i, (h, _) in enumerate(outs)]
    hooks += [(o, functools.partial(write, index=i)) for i, (_, o) in enumerate(outs)]
    log_q = model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
    loss = torch.zeros((), dtype=torch.float64)
    for index, copy in enumerate(copies):
        mse = (copy(inputs[index]) - targets[index]).pow(2).sum(-1).mean()
        loss = loss + 0.5 * (mse + (mse / (kl + 1e-8)).detach() * kl)
    loss.backward()
    for index, copy in enumerate(copies):
        for key, parameter in copy.named_parameters():
            expected, ours = parameter.grad, seen[f"sae_{index}"][key]
            assert expected.abs().max() > 0, (index, key)
            assert (ours - expected).abs().max() <= 1e-10 * expected.abs().max(), (index, key)


def test_joint_fine_tune_reports_the_replacement_model_before_and_after(tmp_path) -> None:
    model = tiny_model()
    joint = kl_finetune(
        transcoder_set(), model, DATA, replacement="joint", save_dir=tmp_path / "joint", **OPTIONS
    )
    independent = kl_finetune(transcoder_set(), model, DATA, **OPTIONS)
    report = json.loads((tmp_path / "joint" / "sae_0" / "kl_finetune_metrics.json").read_text())
    replacement = report["replacement_model"]
    assert set(replacement) == {"before", "after", "after_minus_before_95"}
    low, high = replacement["after_minus_before_95"]["kl"]
    assert low < high and replacement["after"]["kl"] != replacement["before"]["kl"]
    assert joint[0].cfg.metadata.kl_finetune["replacement_model"] == replacement
    # the same starting set, other gradients: the results differ from independent fine-tunes
    assert not torch.equal(joint[1].W_dec, independent[1].W_dec)


def test_what_is_no_joint_replacement_model_is_refused() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="two or more"):
        kl_finetune(transcoder_set(layers=range(1)), model, DATA, replacement="joint", **OPTIONS)
    with pytest.raises(ValueError, match="two or more"):
        kl_finetune([make_sae("topk"), make_sae("topk", seed=2)], model, DATA, replacement="joint", **OPTIONS)
    with pytest.raises(ValueError, match="out of order"):
        kl_finetune(transcoder_set()[::-1], model, DATA, replacement="joint", **OPTIONS)
    with pytest.raises(ValueError, match="loss='kl\\+mse'"):
        kl_finetune(transcoder_set(), model, DATA, replacement="joint", loss="kl", **OPTIONS)
