"""Workarounds for sae-bench 0.6.0, in one place: SAEBench loads its model by name, seeds the
global generators, reads its defaults from function signatures and its vocabulary from the
tokenizer, and expects unit-norm decoder rows; each helper says which of these it handles."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_lens_kl.checks import same_model
from sae_lens_kl.saebench.specs import MIN_WORDS_PER_LETTER, SAEBenchError


def saebench_copy(sae: SAE[Any]) -> SAE[Any]:
    """A copy of `sae` with unit-norm decoder rows where SAELens can fold the norms into the
    encoder without changing what the SAE computes, as SAEBench does to every SAE it loads from
    the hub (its decoder-based metrics assume unit rows) but not to an SAE object. Without it, an
    SAE saved in training form (decoder norms unfolded) and its fine-tuned inference form would
    differ in every weight-based number for no reason. A copy, because SAEBench edits the config
    of the SAE it evaluates."""
    evaluated = copy.deepcopy(sae)
    with contextlib.suppress(NotImplementedError):  # e.g. TopK without rescale_acts_by_decoder_norm
        evaluated.fold_W_dec_norm()
    return evaluated


def seed_everything(seed: int) -> None:
    import numpy

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def caller_rng_kept() -> Iterator[None]:
    """The evals seed Python's, numpy's and torch's generators and switch grad mode off; the
    caller's generator states and grad mode come back."""
    import numpy

    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    grad_enabled = torch.is_grad_enabled()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)
            torch.set_grad_enabled(grad_enabled)


@contextlib.contextmanager
def serving(model: HookedTransformer, module: Any) -> Iterator[None]:
    """sae-bench 0.6.0 loads its model by name inside run_eval
    (HookedTransformer.from_pretrained_no_processing), which TransformerLens cannot do for a local
    or unofficial model: for the call, the module's HookedTransformer answers with `model`."""

    class Served:
        @staticmethod
        def from_pretrained_no_processing(name: str, **_: Any) -> HookedTransformer:
            if not same_model(name, model.cfg.model_name):
                raise SAEBenchError(
                    f"SAEBench asked for model {name!r}; this run serves {model.cfg.model_name!r}."
                )
            return model

    original = module.HookedTransformer
    module.HookedTransformer = Served
    try:
        yield
    finally:
        module.HookedTransformer = original


@contextlib.contextmanager
def defaults_replaced(function: Callable[..., Any], **values: Any) -> Iterator[None]:
    """For the call, `function`'s keyword defaults named in `values` are replaced."""
    saved = function.__defaults__
    parameters = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    function.__defaults__ = tuple(values.get(p.name, p.default) for p in parameters)
    try:
        yield
    finally:
        function.__defaults__ = saved


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def vocabulary_sample(model: HookedTransformer, words: int, seed: int) -> HookedTransformer:
    """A view of `model` whose tokenizer lists only about `words` of its alphabetic tokens, drawn
    (seeded) in proportion to their first letters with at least `MIN_WORDS_PER_LETTER` of each:
    SAEBench builds absorption's tasks from `tokenizer.vocab` and needs every letter in its probe's
    training split. Tokenising is unchanged; the modules are shared, the model's own tokenizer is
    untouched."""
    from sae_bench.evals.absorption.vocab import convert_tokens_to_string, get_alpha_tokens

    tokenizer = model.tokenizer
    assert tokenizer is not None
    vocab = tokenizer.get_vocab()
    by_letter: dict[str, list[str]] = {}
    for token in get_alpha_tokens(tokenizer, replace_special_chars=False):
        word = convert_tokens_to_string(token, tokenizer)
        by_letter.setdefault(word.strip()[0].lower(), []).append(token)
    total = sum(len(tokens) for tokens in by_letter.values())
    if words >= total:
        return model
    draw = random.Random(seed)
    sample: dict[str, int] = {}
    for letter in sorted(by_letter):
        tokens = sorted(by_letter[letter])
        count = min(len(tokens), max(MIN_WORDS_PER_LETTER, round(words * len(tokens) / total)))
        sample.update({token: vocab[token] for token in draw.sample(tokens, count)})
    view_tokenizer = copy.copy(tokenizer)
    view_tokenizer.get_vocab = lambda: dict(sample)  # `vocab` is a property over get_vocab()
    view = copy.copy(model)  # shallow: same modules, hooks and weights
    view.tokenizer = view_tokenizer
    return view
