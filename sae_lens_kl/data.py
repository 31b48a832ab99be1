"""Token sequences in dataset order from the sources users have: HF datasets (by name or object,
streaming or not, text or pre-tokenised), lists of strings, local text files, token tensors.

KL training cannot shuffle activations, so sequences come out in a fixed, reproducible order; a
resumed run skips the sequences it already trained on.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from transformer_lens.hook_points import HookedRootModule

DataSource = str | Path | Sequence[str] | Sequence[Path] | torch.Tensor | Any
TEXT_FILE_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".json", ".html", ".py")
_TOKEN_COLUMNS = ("tokens", "input_ids")
_TEXT_COLUMNS = ("text", "content")


class DataError(ValueError):
    pass


def describe(data: DataSource) -> str:
    if isinstance(data, (str, Path)):
        return str(data)
    if isinstance(data, torch.Tensor):
        return f"token tensor {tuple(data.shape)}"
    if isinstance(data, (list, tuple)):
        return f"{len(data)} items"
    return type(data).__name__


def check_data_kind(data: Any) -> None:
    """Refuse, before any work, data of a kind no reader here takes."""
    import datasets

    from sae_lens_kl.cache import CleanPassCache

    readable = (str, Path, torch.Tensor, CleanPassCache, datasets.Dataset, datasets.IterableDataset)
    readable += (datasets.DatasetDict, datasets.IterableDatasetDict)
    if data is None or isinstance(data, readable):
        return
    if isinstance(data, (list, tuple)) and (
        all(isinstance(item, str) for item in data) or all(isinstance(item, Path) for item in data)
    ):
        return
    raise DataError(
        f"data={describe(data)[:80]} ({type(data).__name__}) is not a kind kl_finetune reads; pass a "
        "Hugging Face dataset name or object, a list of strings, a local text file or folder (a "
        "list of Paths), a [n, seq] token tensor or a clean-pass cache folder."
    )


def _local_files(data: DataSource) -> list[Path] | None:
    """The text files named by `data`, or None when it does not name local paths."""
    candidates: list[Any]
    if isinstance(data, (str, Path)):
        candidates = [data]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, Path) for x in data):
        candidates = list(data)
    else:
        return None
    files: list[Path] = []
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_FILE_SUFFIXES)
            if not found:
                raise DataError(f"Folder {path} holds no text files ({', '.join(TEXT_FILE_SUFFIXES)}).")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif isinstance(candidate, Path):
            raise DataError(f"Data file {path} does not exist.")
        else:
            return None  # a string that is not a local path: a Hugging Face dataset name
    return files


def documents(data: DataSource) -> Iterator[str | torch.Tensor]:
    """Documents as text or as 1-D token tensors, in order."""
    files = _local_files(data)
    if files is not None:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            # U+FFFD stands for each byte that is not UTF-8: many of them mean a binary file
            if (replaced := text.count("\ufffd")) > max(10, len(text) // 100):
                warnings.warn(
                    f"{path} is not UTF-8 text: {replaced} of its {len(text)} characters could not be "
                    "decoded (a binary file?); it is trained on as replacement characters. Remove it "
                    "from the data.",
                    stacklevel=2,
                )
            yield text
        return
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.dtype not in (torch.int32, torch.int64):
            raise DataError(
                f"A token tensor must be 2-D integer [n, seq], got {data.dtype} {tuple(data.shape)}."
            )
        yield from data.long()
        return
    if isinstance(data, (list, tuple)):
        for item in data:
            if not isinstance(item, str):
                raise DataError(f"A list of data must hold strings, found {type(item).__name__}.")
            yield item
        return
    if isinstance(data, str):
        data = _load_hub_dataset(data)
    yield from _dataset_rows(data)


def _load_hub_dataset(name: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split="train", streaming=True)
    except Exception as error:  # datasets raises many types for missing/offline datasets
        raise DataError(
            f"Could not load the dataset {name!r}: it is not a local file or folder, and loading it "
            f"from the Hugging Face hub failed ({type(error).__name__}: {error}). Pass a local "
            "folder of text files, a list of strings, a datasets.Dataset, or run where the hub is "
            "reachable."
        ) from error


def _dataset_rows(dataset: Any) -> Iterator[str | torch.Tensor]:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" not in dataset:
            raise DataError(f"The dataset has splits {list(dataset)}; pass one split, e.g. ds['test'].")
        dataset = dataset["train"]
    token_column = text_column = None
    for row in dataset:
        if token_column is None and text_column is None:
            # Streaming datasets may not know their columns until the first row.
            columns = list(row)
            token_column = next((c for c in _TOKEN_COLUMNS if c in columns), None)
            text_column = next((c for c in _TEXT_COLUMNS if c in columns), None)
            if token_column is None and text_column is None:
                raise DataError(
                    f"The dataset has columns {columns}; expected a text column {_TEXT_COLUMNS} or a "
                    f"pre-tokenised one {_TOKEN_COLUMNS}. Rename the column or pass the texts as a list."
                )
        if token_column is not None:
            yield torch.as_tensor(row[token_column], dtype=torch.long)
        else:
            yield row[text_column]


def token_sequences(
    data: DataSource,
    model: HookedRootModule,
    context_size: int,
    prepend_bos: bool,
) -> Iterator[torch.Tensor]:
    """Sequences of exactly `context_size` tokens, packed as SAELens's ActivationsStore packs them
    (documents concatenated with BOS between them; BOS first in each sequence when prepend_bos)."""
    tokenizer = getattr(model, "tokenizer", None)
    bos = None if tokenizer is None else tokenizer.bos_token_id
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)

    def tokenized() -> Iterator[torch.Tensor]:
        for index, row in enumerate(documents(data)):
            if isinstance(row, torch.Tensor) and row.numel() and d_vocab is not None:
                low, high = int(row.min()), int(row.max())
                if low < 0 or high >= d_vocab:
                    raise DataError(
                        f"Document {index} of the data holds token ids from {low} to {high}, outside "
                        f"[0, {d_vocab}) for this model; tokenize with the model's tokenizer."
                    )
            if isinstance(row, str):
                if tokenizer is None:
                    raise DataError(
                        "The data is text but the model has no tokenizer; pass token ids instead."
                    )
                row = model.to_tokens(row, prepend_bos=False, truncate=False, move_to_device=False)[0]
            if row.numel():
                yield row

    yield from concat_and_batch_sequences(
        tokens_iterator=tokenized(),
        context_size=context_size,
        begin_batch_token_id=bos if prepend_bos else None,
        begin_sequence_token_id=None,
        sequence_separator_token_id=bos,
    )


def batched(sequences: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """[batch_size, seq] batches; a final incomplete batch is dropped (steps are equal-sized)."""
    iterator = iter(sequences)
    while batch := list(itertools.islice(iterator, batch_size)):
        if len(batch) < batch_size:
            return
        yield torch.stack(batch)


def take(sequences: Iterator[torch.Tensor], count: int) -> torch.Tensor | None:
    """The next `count` sequences as one tensor, or None when fewer remain."""
    batch = list(itertools.islice(sequences, count))
    return torch.stack(batch) if len(batch) == count and count > 0 else None


def held_out_sequences(
    data: DataSource, model: HookedRootModule, *, n_tokens: int, context_size: int, prepend_bos: bool
) -> torch.Tensor:
    """The first `n_tokens` tokens of `data` as [n_seq, seq] sequences (rounded up to whole
    sequences of `context_size`; a [n_seq, seq] token tensor is used as it is)."""
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be a positive number of tokens to evaluate.")
    if isinstance(data, torch.Tensor) and data.ndim == 2:
        n_seq = -(-n_tokens // data.shape[1])
        if len(data) < n_seq:
            raise DataError(
                f"The evaluation data holds {len(data)} sequences of {data.shape[1]} tokens, fewer "
                f"than the {n_seq} that n_tokens={n_tokens} needs; lower n_tokens or pass more data."
            )
        return data[:n_seq].long()
    n_seq = -(-n_tokens // context_size)
    sequences = take(token_sequences(data, model, context_size, prepend_bos), n_seq)
    if sequences is None:
        raise DataError(
            f"The evaluation data holds fewer than the {n_seq} sequences of {context_size} tokens "
            f"that n_tokens={n_tokens} needs; lower n_tokens or pass more data."
        )
    return sequences


def held_out_and_training(
    data: DataSource,
    eval_data: DataSource | None,
    model: HookedRootModule,
    *,
    context_size: int,
    prepend_bos: bool,
    n_eval_sequences: int,
    consumed: int,
) -> tuple[torch.Tensor | None, Iterator[torch.Tensor]]:
    """(held-out evaluation sequences, the training sequences after the `consumed` ones). Held-out
    sequences come first in the data's stream unless `eval_data` is given; training follows them
    and never sees them."""
    sequences = token_sequences(data, model, context_size, prepend_bos)
    eval_sequences = None
    if n_eval_sequences:
        source = eval_data if eval_data is not None else data
        stream = sequences if eval_data is None else token_sequences(source, model, context_size, prepend_bos)
        eval_sequences = take(stream, n_eval_sequences)
        if eval_sequences is None:
            raise DataError(
                f"The {'evaluation ' if eval_data is not None else ''}data ({describe(source)}) holds "
                f"fewer than {n_eval_sequences} sequences of {context_size} tokens for the held-out "
                "evaluation; lower eval_tokens or pass more data."
            )
    return eval_sequences, itertools.islice(sequences, consumed, None)


def budgeted(batches: Iterator[Any], steps: int, data: DataSource, tokens: int) -> Iterator[Any]:
    """The first `steps` batches. No batch at all is an error now, before any work; running out
    later is an error naming the budget when it happens (checkpoints written so far are kept)."""
    first = next(batches, None)
    if first is None:
        raise DataError(
            f"The data ({describe(data)}) has no training batch left after the held-out "
            "sequences; pass more data or lower eval_tokens."
        )

    def guarded() -> Iterator[Any]:
        for served, batch in enumerate(itertools.chain([first], batches), start=1):
            yield batch
            if served == steps:
                return
        raise DataError(
            f"The data ({describe(data)}) ran out before the token budget tokens={tokens}. "
            "Checkpoints written so far are kept; pass more data and resume_from, or lower tokens."
        )

    return guarded()
