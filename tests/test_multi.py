"""Several SAEs per pass: each result identical to fine-tuning it alone on the same tokens."""

from __future__ import annotations

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


def test_several_saes_per_pass_equal_each_alone(tmp_path) -> None:
    model = tiny_model()
    saes = [
        make_sae("topk", hook_name="blocks.1.hook_resid_pre", seed=1),
        make_sae("topk", hook_name="blocks.1.hook_resid_pre", seed=2),
        make_sae("standard", hook_name="blocks.2.hook_resid_post", seed=3),
        make_sae("jumprelu", hook_name="blocks.0.hook_mlp_out", seed=4),
    ]
    together = kl_finetune(saes, model, DATA, save_dir=tmp_path / "multi", **OPTIONS)
    assert isinstance(together, list) and len(together) == len(saes)
    for index, (sae, tuned) in enumerate(zip(saes, together, strict=True)):
        alone = kl_finetune(sae, model, DATA, **OPTIONS)
        for name, tensor in alone.state_dict().items():
            assert torch.equal(tensor, tuned.state_dict()[name]), (index, name)
        assert alone.cfg.metadata.kl_finetune["after"] == tuned.cfg.metadata.kl_finetune["after"]
        folder = tmp_path / "multi" / f"sae_{index}"
        assert torch.equal(SAE.load_from_disk(folder).W_dec, tuned.W_dec)
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["192", "final_384"]
