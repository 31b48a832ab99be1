"""Transcoders (SAELens's Transcoder family): input hook -> output hook, fine-tuned like SAEs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import SAE, HookedSAETransformer

from sae_lens_kl import evaluate, kl_finetune
from sae_lens_kl.architectures import to_inference_sae, to_training_sae
from sae_lens_kl.transcoders import TRANSCODER_ARCHITECTURES, TranscoderStepInput

SEQ = 16
DATA = random_tokens(160, seq=SEQ)
FAST = {"eval_tokens": 32 * SEQ, "batch_size": 4, "kl_chunk_tokens": 16}
MLP_IN, MLP_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def transcoder(architecture: str, **fields: object) -> SAE:
    sae = make_sae(architecture, **fields)
    if "skip" in architecture:  # SAELens zero-initialises the skip; make it matter
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("architecture", TRANSCODER_ARCHITECTURES)
def test_training_transcoder_computes_what_the_inference_one_does(architecture: str) -> None:
    sae = transcoder(architecture)
    training = to_training_sae(sae)
    x, target = torch.randn(40, sae.cfg.d_in), torch.randn(40, sae.cfg.d_out)
    step = TranscoderStepInput(
        sae_in=x,
        coefficients=dict.fromkeys(training.get_coefficients(), 1.0),
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
        target=target,
    )
    out = training.training_forward_pass(step)
    # the same operations in the same order as SAELens's transcoder: equal, not close
    assert torch.equal(out.sae_out, sae(x))
    assert torch.equal(out.losses["mse_loss"], (sae(x) - target).pow(2).sum(-1).mean())
    back = to_inference_sae(training)
    assert type(back) is type(sae)
    assert back.cfg.metadata.hook_name_out == MLP_OUT
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_transcoder_step_needs_its_target() -> None:
    training = to_training_sae(transcoder("transcoder"))
    with pytest.raises(TypeError, match="output hook"):
        training.training_forward_pass(
            TranscoderStepInput.__mro__[1](  # a plain TrainStepInput
                sae_in=torch.randn(2, 32),
                coefficients={"l1": 1.0},
                dead_neuron_mask=None,
                n_training_steps=0,
                is_logging_step=False,
            )
        )


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder"])
def test_evaluation_splices_the_transcoders_forward_at_its_output_hook(architecture: str) -> None:
    """CE with the transcoder spliced, and its MSE, against a plain TransformerLens splice of
    `sae.forward` and SAELens's HookedSAETransformer, in float64 (rounding ~1e-16 relative)."""
    model = tiny_model(dtype=torch.float64)
    sae = transcoder(architecture, dtype="float64")
    tokens = DATA[:8]
    result = evaluate(sae, model, tokens, n_tokens=tokens.numel(), exclude_special_tokens=False)

    seen = {}

    def keep_input(raw: torch.Tensor, hook: object) -> torch.Tensor:  # noqa: ARG001
        seen["in"] = raw
        return raw

    def replace_output(raw: torch.Tensor, hook: object) -> torch.Tensor:  # noqa: ARG001
        seen["out"] = raw
        return sae(seen["in"])

    with torch.no_grad():
        reference_ce = model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(MLP_IN, keep_input), (MLP_OUT, replace_output)]
        ).item()
    error = sae(seen["in"]) - seen["out"]
    assert result.ce_spliced == pytest.approx(reference_ce, rel=1e-10)
    assert result.mse == pytest.approx(error.pow(2).sum(-1).mean().item(), rel=1e-10)
    assert result.ce_spliced != pytest.approx(result.ce_clean, rel=1e-3)  # the splice mattered

    sae_model = HookedSAETransformer(model.cfg)
    sae_model.load_state_dict(model.state_dict())
    sae_model.add_sae(sae)
    with torch.no_grad():
        saelens_ce = sae_model(tokens, return_type="loss").item()
    if architecture == "transcoder":
        assert result.ce_spliced == pytest.approx(saelens_ce, rel=1e-10)
    else:
        # HookedSAETransformer (sae-lens 6.54.12) splices encode -> decode and drops a
        # SkipTranscoder's W_skip term; we splice the transcoder's forward, skip included.
        assert result.ce_spliced != pytest.approx(saelens_ce, rel=1e-6)


@pytest.mark.parametrize("architecture", ["transcoder", "jumprelu_skip_transcoder"])
def test_kl_finetune_trains_a_transcoder_and_saves_it_as_saelens_does(architecture: str, tmp_path) -> None:
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sae = transcoder(architecture)
    tuned = kl_finetune(sae, model, DATA, tokens=24 * 4 * SEQ, lr=2e-3, save_dir=tmp_path, **FAST)
    report = tuned.cfg.metadata.kl_finetune
    assert type(tuned) is type(sae)
    assert report["after"]["kl"] < 0.8 * report["before"]["kl"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is type(sae)
    assert (loaded.cfg.metadata.hook_name, loaded.cfg.metadata.hook_name_out) == (MLP_IN, MLP_OUT)
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_mse_only_fine_tune_of_a_transcoder_lowers_its_error_against_the_output_hook() -> None:
    # loss="mse" stops the clean pass after the output hook's block (no distribution needed)
    tuned = kl_finetune(
        transcoder("transcoder"), tiny_model(), DATA, tokens=24 * 4 * SEQ, lr=2e-3, loss="mse", **FAST
    )
    report = tuned.cfg.metadata.kl_finetune
    assert report["after"]["mse"] < 0.8 * report["before"]["mse"]


def test_transcoder_bad_input_is_refused_before_any_work(tmp_path) -> None:
    model = tiny_model()
    no_output = transcoder("transcoder")
    no_output.cfg.metadata.hook_name_out = None
    with pytest.raises(ValueError, match="hook_name_out"):
        kl_finetune(no_output, model, DATA, tokens=4 * SEQ * 4, **FAST)
    backwards = transcoder("transcoder", hook_name="blocks.2.hook_resid_pre")
    with pytest.raises(ValueError, match="does not come after its input hook"):
        kl_finetune(backwards, model, DATA, tokens=4 * SEQ * 4, **FAST)
    with pytest.raises(ValueError, match="without adapter"):
        kl_finetune(transcoder("transcoder"), model, DATA, tokens=4 * SEQ * 4, adapter="mlp", **FAST)
    narrow = transcoder("transcoder", d_out=16)
    with pytest.raises(ValueError, match="writes 16-dimensional"):
        kl_finetune(narrow, model, DATA, tokens=4 * SEQ * 4, save_dir=tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()
