"""Every data source yields the same token sequences, in dataset order."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import sentences, tiny_text_model

from sae_lens_kl.checkpoints import data_fingerprint
from sae_lens_kl.data import DataError, batched, take, token_sequences

CTX = 16


@pytest.fixture(scope="module")
def model():
    return tiny_text_model()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return sentences(40, seed=3)


def first(data, model, n: int = 10) -> torch.Tensor:
    out = take(token_sequences(data, model, CTX, prepend_bos=True), n)
    assert out is not None
    return out


def test_sources_agree(model, docs, tmp_path) -> None:
    reference = first(docs, model)
    assert reference.shape == (10, CTX)
    assert (reference[:, 0] == model.tokenizer.bos_token_id).all()

    text_dataset = datasets.Dataset.from_dict({"text": docs})
    assert torch.equal(first(text_dataset, model), reference)
    assert torch.equal(first(datasets.DatasetDict({"train": text_dataset}), model), reference)
    streaming = datasets.IterableDataset.from_generator(lambda: ({"text": d} for d in docs))
    assert torch.equal(first(streaming, model), reference)

    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(doc)
    assert torch.equal(first(folder, model), reference)
    assert torch.equal(first(str(folder), model), reference)

    tokenised = [model.to_tokens(d, prepend_bos=False, truncate=False)[0].tolist() for d in docs]
    token_dataset = datasets.Dataset.from_dict({"input_ids": tokenised})
    assert torch.equal(first(token_dataset, model), reference)


def test_batches_are_in_order_and_equal_sized(model, docs) -> None:
    sequences = first(docs, model, 9)
    batches = list(batched(iter(sequences), 4))
    assert len(batches) == 2  # the incomplete third batch is dropped
    assert torch.equal(torch.cat(batches), sequences[:8])


def test_bad_sources_say_what_to_do(model, tmp_path) -> None:
    with pytest.raises(DataError, match="columns"):
        first(datasets.Dataset.from_dict({"body": ["x"]}), model)
    with pytest.raises(DataError, match="no text files"):
        first(tmp_path, model)
    with pytest.raises(DataError, match="hub"):
        first("no-such-user/no-such-dataset-xyz", model)
    with pytest.raises(DataError, match="strings"):
        first(["fine", 3], model)


def test_data_fingerprint_names_the_content() -> None:
    # The resume check compares data fingerprints; for a Dataset it rests on datasets' private
    # `_fingerprint` (a hash of its content): if that goes or stops naming the content, two
    # different texts of one length would pass for the same data.
    texts = ["the first text", "the second text"]
    same = datasets.Dataset.from_dict({"text": list(texts)})
    assert isinstance(same._fingerprint, str)
    prints = {
        data_fingerprint(datasets.Dataset.from_dict({"text": texts})),
        data_fingerprint(same),
    }
    assert len(prints) == 1
    other = datasets.Dataset.from_dict({"text": ["the first text", "another text"]})
    assert data_fingerprint(other) not in prints
    # lists of texts: by content, the boundaries between items included
    assert data_fingerprint(["ab", "c"]) != data_fingerprint(["a", "bc"])
    assert data_fingerprint(list(texts)) == data_fingerprint(list(texts))
    assert data_fingerprint(texts) != data_fingerprint(["the first text", "another text"])
