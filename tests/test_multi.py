"""Several SAEs per pass: each result identical to fine-tuning it alone on the same tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import SAE

from sae_lens_kl import kl_finetune
from sae_lens_kl.vocab import VocabProjection

SEQ = 16
DATA = random_tokens(60, seq=SEQ)
OPTIONS = {
    "tokens": 6 * 4 * SEQ,
    "lr": 2e-3,
    "batch_size": 4,
    "eval_tokens": 8 * SEQ,
    "kl_chunk_tokens": 16,
    "checkpoint_every_tokens": 3 * 4 * SEQ,
}


SAES = [
    ("topk", "blocks.1.hook_resid_pre", 1),
    ("topk", "blocks.1.hook_resid_pre", 2),
    ("standard", "blocks.2.hook_resid_post", 3),
    ("jumprelu", "blocks.0.hook_mlp_out", 4),
]


# From three SAEs on, the clean distribution is shared as CleanStatistics: the same KL and
# gradients as each SAE's own clean logits, computed with other rounding. That run is compared in
# float64 (unit roundoff u = 1.1e-16): each gradient is a sum over <= 67 vocabulary or 32 model
# dimensions, so it differs by a few hundred u relative at most, and six Adam steps (whose update
# is scale-invariant in the gradient) carry that into the weights with an amplification of order
# one, ~1e-14 of what training moved them. TOLERANCE leaves 10^5 of room above that; an error in
# the statistics' formulas shows at >= 1e-3. (In float32, u = 6e-8, the same comparison measured
# 3e-6 on one machine and 1e-5 on another: too close to any bound to be a test.)
TOLERANCE = 1e-9


def assert_trained_alike(start: SAE, alone: SAE, together: SAE, *, exact: bool, index: int) -> None:
    """`together` (trained beside others) has `alone`'s weights: bit for bit when `exact`, else
    within TOLERANCE of how far training moved each weight."""
    for name, tensor in alone.state_dict().items():
        if exact:
            assert torch.equal(tensor, together.state_dict()[name]), (index, name)
        else:
            moved = (tensor - start.state_dict()[name]).norm()
            assert moved > 0, (index, name)
            assert (together.state_dict()[name] - tensor).norm() <= TOLERANCE * moved, (index, name)


@pytest.mark.parametrize("n_saes", [2, 4])
def test_several_saes_per_pass_equal_each_alone(n_saes: int, tmp_path) -> None:
    # Two SAEs each form the clean logits as alone: bit-identical (float32). From three on, the
    # clean distribution is shared as statistics: equal up to float64 rounding.
    dtype = torch.float32 if n_saes == 2 else torch.float64
    model = tiny_model(dtype=dtype)
    assert VocabProjection.for_run(model, prefix_reuse=True).supports_statistics
    saes = [
        make_sae(arch, hook_name=hook, seed=seed, dtype=str(dtype).removeprefix("torch."))
        for arch, hook, seed in SAES[:n_saes]
    ]
    together = kl_finetune(saes, model, DATA, save_dir=tmp_path / "multi", **OPTIONS)
    assert isinstance(together, list) and len(together) == len(saes)
    for index, (sae, tuned) in enumerate(zip(saes, together, strict=True)):
        alone = kl_finetune(sae, model, DATA, **OPTIONS)
        alone_report, tuned_report = alone.cfg.metadata.kl_finetune, tuned.cfg.metadata.kl_finetune
        assert_trained_alike(sae, alone, tuned, exact=n_saes == 2, index=index)
        if n_saes == 2:
            assert alone_report["after"] == tuned_report["after"]
        else:
            assert tuned_report["after"]["kl"] == pytest.approx(alone_report["after"]["kl"], rel=TOLERANCE)
        folder = tmp_path / "multi" / f"sae_{index}"
        assert torch.equal(SAE.load_from_disk(folder).W_dec, tuned.W_dec)
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["192", "final_384"]


class Interrupt(Exception):
    pass


def test_several_saes_per_pass_resume_to_the_weights_of_an_uninterrupted_run(tmp_path) -> None:
    model = tiny_model()
    saes = [make_sae(arch, hook_name=hook, seed=seed) for arch, hook, seed in SAES[:2]]
    options = {**OPTIONS, "tokens": 8 * 4 * SEQ, "checkpoint_every_tokens": 2 * 4 * SEQ}
    whole = kl_finetune(saes, model, DATA, save_dir=tmp_path / "whole", **options)

    def crash_after_five_steps(trainer, output) -> None:  # noqa: ARG001
        if trainer.n_training_steps == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        kl_finetune(
            saes, model, DATA, save_dir=tmp_path / "run", callbacks=[crash_after_five_steps], **options
        )
    # as if the run was killed between writing the two SAEs' checkpoints of step 4: SAE 1 lacks its
    # newest one, so both resume from step 2
    newest = tmp_path / "run" / "sae_1" / "checkpoints" / str(4 * 4 * SEQ)
    assert newest.is_dir()
    for file in newest.iterdir():
        file.unlink()
    newest.rmdir()
    resumed = kl_finetune(
        saes, model, DATA, save_dir=tmp_path / "run", resume_from=tmp_path / "run", **options
    )
    for alone, again in zip(whole, resumed, strict=True):
        for name, tensor in alone.state_dict().items():
            assert torch.equal(tensor, again.state_dict()[name]), name
        assert again.cfg.metadata.kl_finetune["training_tokens"] == 8 * 4 * SEQ


@pytest.mark.parametrize("n_layers", [2, 3])
def test_a_transcoder_at_each_layer_per_pass_equals_each_alone(n_layers: int) -> None:
    # Transcoders of every layer's MLP in lockstep ("independent": each spliced alone, its own
    # KL), sharing the clean pass that records each one's input and output; as for SAEs, two are
    # bit-identical to training alone, from three on equal up to float64 rounding (TOLERANCE).
    dtype = torch.float32 if n_layers == 2 else torch.float64
    model = tiny_model(dtype=dtype)
    transcoders = [
        make_sae("transcoder", hook_name=f"blocks.{layer}.ln2.hook_normalized", seed=layer + 1)
        for layer in range(n_layers)
    ]
    transcoders = [t.to(dtype) for t in transcoders]
    options = {**OPTIONS, "checkpoint_every_tokens": None}
    together = kl_finetune(transcoders, model, DATA, **options)
    for index, (start, tuned) in enumerate(zip(transcoders, together, strict=True)):
        alone = kl_finetune(start, model, DATA, **options)
        assert tuned.cfg.metadata.hook_name_out == f"blocks.{index}.hook_mlp_out"
        assert_trained_alike(start, alone, tuned, exact=n_layers == 2, index=index)
