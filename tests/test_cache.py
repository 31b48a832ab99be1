"""Fine-tuning from a cached clean pass equals the online step on the same tokens."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_sae, random_tokens, tiny_model
from test_multi import TOLERANCE

from sae_lens_kl import kl_finetune
from sae_lens_kl.cache import CleanPassCache, build_cache

SEQ = 16
DATA = random_tokens(72, seq=SEQ)
OPTIONS = {"lr": 2e-3, "batch_size": 4, "eval_tokens": 8 * SEQ, "kl_chunk_tokens": 16}


@pytest.mark.parametrize(
    ("hook_name", "softcap"),
    [("blocks.1.hook_resid_pre", None), ("blocks.1.hook_resid_post", None), ("blocks.1.hook_resid_pre", 3.0)],
)
def test_cached_fine_tune_equals_the_online_one(hook_name: str, softcap: float | None, tmp_path) -> None:
    # A linear unembedding is cached as clean statistics (same KL and gradients, other float
    # rounding: compared in float64, bound derived in test_multi.py); a softcapped one as
    # unembedding inputs, which replays the online step bit for bit (float32).
    dtype = torch.float32 if softcap else torch.float64
    model = tiny_model(dtype=dtype, **({} if softcap is None else {"output_logits_soft_cap": softcap}))
    cache = build_cache(
        model,
        DATA,
        hook_name,
        tmp_path / "cache",
        tokens=40 * SEQ,
        context_size=SEQ,
        prepend_bos=False,
        batch_size=3,
        shard_sequences=7,
    )
    assert cache.n_sequences == 40 and len(cache.meta["shards"]) == 5  # 9+9+9+9+4: batches cross shards
    assert cache.meta["clean_distribution"] == ("final" if softcap else "statistics")
    sae = make_sae("topk", hook_name=hook_name, dtype=str(dtype).removeprefix("torch."))
    online = kl_finetune(sae, model, DATA[:40], tokens=8 * 4 * SEQ, **OPTIONS)
    cached = kl_finetune(sae, model, cache, tokens=8 * 4 * SEQ, **OPTIONS)
    online_report, cached_report = online.cfg.metadata.kl_finetune, cached.cfg.metadata.kl_finetune
    if softcap:
        for name, tensor in online.state_dict().items():
            assert torch.equal(tensor, cached.state_dict()[name]), name
        assert online_report["after"] == cached_report["after"]
        return
    for name, tensor in online.state_dict().items():
        moved = (tensor - sae.state_dict()[name]).norm()
        assert moved > 0, name
        # the runs differ by float rounding only: far less than the training moved the weights
        assert (cached.state_dict()[name] - tensor).norm() <= TOLERANCE * moved, name
    assert cached_report["after"]["kl"] == pytest.approx(online_report["after"]["kl"], rel=TOLERANCE)


def test_one_cache_serves_several_saes_and_epochs(tmp_path) -> None:
    model = tiny_model()
    cache = build_cache(
        model,
        DATA,
        "blocks.1.hook_resid_pre",
        tmp_path / "cache",
        tokens=20 * SEQ,
        context_size=SEQ,
        prepend_bos=False,
    )
    # 12 training sequences after 8 held out: 3 batches per epoch; 10 steps = 3+ epochs
    for architecture in ("topk", "standard"):
        tuned = kl_finetune(make_sae(architecture), model, cache, tokens=10 * 4 * SEQ, **OPTIONS)
        report = tuned.cfg.metadata.kl_finetune
        assert report["steps"] == 10
        assert report["after"]["kl"] < report["before"]["kl"]


def test_cache_refuses_what_it_does_not_hold(tmp_path) -> None:
    model = tiny_model()
    cache = build_cache(
        model,
        DATA,
        "blocks.1.hook_resid_pre",
        tmp_path / "cache",
        tokens=12 * SEQ,
        context_size=SEQ,
        prepend_bos=False,
    )
    with pytest.raises(ValueError, match="not the SAE's 'blocks.2.hook_resid_pre'"):
        kl_finetune(
            make_sae("topk", hook_name="blocks.2.hook_resid_pre"), model, cache, tokens=4 * SEQ, **OPTIONS
        )
    with pytest.raises(ValueError, match="leave context_size unset"):
        kl_finetune(make_sae("topk"), model, cache, tokens=4 * 8, **{**OPTIONS, "context_size": 8})
    with pytest.raises(FileExistsError):
        build_cache(
            model, DATA, "blocks.1.hook_resid_pre", tmp_path / "cache", tokens=12 * SEQ, context_size=SEQ
        )
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    (tmp_path / "cache" / "cache.json").unlink()  # as if the build had been killed
    with pytest.raises(FileNotFoundError, match="not a finished clean-pass cache"):
        CleanPassCache(tmp_path / "cache")
    assert meta["format_version"] == 2


def test_a_cache_folder_path_is_read_as_a_cache(tmp_path) -> None:
    model = tiny_model()
    build_cache(
        model,
        DATA,
        "blocks.1.hook_resid_pre",
        tmp_path / "cache",
        tokens=20 * SEQ,
        context_size=SEQ,
        prepend_bos=False,
    )
    from_path = kl_finetune(make_sae("topk"), model, str(tmp_path / "cache"), tokens=2 * 4 * SEQ, **OPTIONS)
    from_object = kl_finetune(
        make_sae("topk"), model, CleanPassCache(tmp_path / "cache"), tokens=2 * 4 * SEQ, **OPTIONS
    )
    assert torch.equal(from_path.W_dec, from_object.W_dec)
