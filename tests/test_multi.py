"""Several SAEs per pass: each result identical to fine-tuning it alone on the same tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import SAE

from sae_lens_kl import kl_finetune

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


@pytest.mark.parametrize("n_saes", [2, 4])
def test_several_saes_per_pass_equal_each_alone(n_saes: int, tmp_path) -> None:
    # Two SAEs each form the clean logits as alone: bit-identical. From three on, the clean
    # distribution is shared as statistics: equal up to float rounding.
    model = tiny_model()
    saes = [make_sae(arch, hook_name=hook, seed=seed) for arch, hook, seed in SAES[:n_saes]]
    together = kl_finetune(saes, model, DATA, save_dir=tmp_path / "multi", **OPTIONS)
    assert isinstance(together, list) and len(together) == len(saes)
    for index, (sae, tuned) in enumerate(zip(saes, together, strict=True)):
        alone = kl_finetune(sae, model, DATA, **OPTIONS)
        alone_report, tuned_report = alone.cfg.metadata.kl_finetune, tuned.cfg.metadata.kl_finetune
        for name, tensor in alone.state_dict().items():
            if n_saes == 2:
                assert torch.equal(tensor, tuned.state_dict()[name]), (index, name)
            else:
                moved = (tensor - sae.state_dict()[name]).norm()
                assert (tuned.state_dict()[name] - tensor).norm() <= 1e-5 * moved, (index, name)
        if n_saes == 2:
            assert alone_report["after"] == tuned_report["after"]
        else:
            assert tuned_report["after"]["kl"] == pytest.approx(alone_report["after"]["kl"], rel=1e-5)
        folder = tmp_path / "multi" / f"sae_{index}"
        assert torch.equal(SAE.load_from_disk(folder).W_dec, tuned.W_dec)
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["192", "final_384"]
