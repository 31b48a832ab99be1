"""Shared fixtures: tiny random TransformerLens models, SAEs of every architecture, token data."""

from __future__ import annotations

import os

# Nothing in the suite may reach the network; the hub libraries must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_class, get_sae_training_class
from transformer_lens import HookedTransformer, HookedTransformerConfig

D_MODEL = 32
N_HEADS = 4
D_HEAD = 8
VOCAB = 67
N_CTX = 64


def tiny_model(seed: int = 0, **overrides: Any) -> HookedTransformer:
    torch.manual_seed(seed)
    fields: dict[str, Any] = {"act_fn": "gelu", "normalization_type": "LN", **overrides}
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=D_MODEL,
        n_heads=N_HEADS,
        d_head=D_HEAD,
        d_mlp=64,
        d_vocab=VOCAB,
        n_ctx=N_CTX,
        model_name="tiny-test-model",
        seed=seed,
        **fields,
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def make_sae(
    architecture: str,
    hook_name: str = "blocks.1.hook_resid_pre",
    d_in: int = D_MODEL,
    d_sae: int = 96,
    training: bool = False,
    seed: int = 1,
    head_index: int | None = None,
    **cfg_fields: Any,
) -> SAE[Any]:
    """An SAE with random weights big enough to matter (decoder rows not tiny), so splicing it
    changes the model's predictions. A transcoder maps block 1's MLP input to its output."""
    torch.manual_seed(seed)
    sae_cls, cfg_cls = (get_sae_training_class if training else get_sae_class)(architecture)
    defaults: dict[str, Any] = {"k": 8} if "topk" in architecture else {}
    if architecture == "matryoshka_batchtopk":
        defaults["matryoshka_widths"] = [32, d_sae]
    transcoder: dict[str, Any] = {}
    if architecture.endswith("transcoder"):  # the MLP's input -> its output, block 1
        defaults.update(d_out=D_MODEL, apply_b_dec_to_input=False)
        if hook_name == "blocks.1.hook_resid_pre":
            hook_name = "blocks.1.ln2.hook_normalized"
        # a transcoder of block L's MLP (ln2.hook_normalized -> hook_mlp_out); otherwise block 1's
        layer = hook_name.split(".")[1] if hook_name.endswith("ln2.hook_normalized") else "1"
        transcoder["hook_name_out"] = f"blocks.{layer}.hook_mlp_out"
    cfg = cfg_cls.from_dict(
        {
            "architecture": architecture,
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": "float32",
            "device": "cpu",
            **defaults,
            **cfg_fields,
            "metadata": {
                "hook_name": hook_name,
                "hook_head_index": head_index,
                "model_name": "tiny-test-model",
                "context_size": 16,
                "prepend_bos": False,
                **transcoder,
            },
        }
    )
    sae = sae_cls(cfg)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name in ("W_enc", "W_dec"):
                param.normal_(0, 0.3)
            elif name in ("b_enc", "b_gate", "b_mag"):
                param.normal_(0, 0.05)
            elif name == "threshold":
                param.fill_(0.05)
    return sae


def random_tokens(n_seq: int, seq: int = 16, seed: int = 123) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n_seq, seq), generator=generator)


@pytest.fixture
def model() -> HookedTransformer:
    return tiny_model()


WORDS = (
    "the",
    "model",
    "reads",
    "a",
    "token",
    "and",
    "writes",
    "its",
    "prediction",
    "while",
    "the",
    "sparse",
    "autoencoder",
    "splits",
    "the",
    "residual",
    "stream",
    "into",
    "latent",
    "features",
    "that",
    "people",
    "can",
    "read",
    "and",
    "interpret",
    "across",
    "many",
    "layers",
    "of",
    "attention",
    "heads",
    "and",
    "small",
    "multilayer",
    "perceptrons",
    "trained",
    "on",
    "text",
    "from",
    "books",
    "and",
    "code",
)


def sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic English-like documents."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(8, 40, (1,), generator=generator))
        picks = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        docs.append(" ".join(WORDS[i] for i in picks).capitalize() + ".")
    return docs


def tiny_tokenizer() -> Any:
    """A real byte-level BPE tokenizer trained here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|bos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(sentences(200, seed=99), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|bos|>", pad_token="<|pad|>"
    )
    # TransformerLens re-loads tokenizers by name_or_path, so give it a real local folder.
    folder = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_text_model(seed: int = 0) -> HookedTransformer:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_heads=N_HEADS,
        d_head=D_HEAD,
        d_mlp=64,
        d_vocab=len(tokenizer),
        n_ctx=N_CTX,
        act_fn="gelu",
        normalization_type="LN",
        model_name="tiny-text-model",
        seed=seed,
    )
    return HookedTransformer(cfg, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory) -> Path:
    """A local Hugging Face folder of a tiny random Llama-architecture model with a real BPE
    tokenizer, as `load_model` and the CLI's --model take it (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    # The folder name matters to TransformerLens's config reading (no "llama"/"gemma" in it).
    folder = tmp_path_factory.mktemp("models") / "tiny-lm"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_folders(tmp_path_factory) -> tuple[Path, Path]:
    """(training, held-out) folders of English-like text files, disjoint."""
    root = tmp_path_factory.mktemp("texts")
    folders = []
    for name, seed in (("train", 1), ("eval", 2)):
        folder = root / name
        folder.mkdir()
        for index in range(40 if name == "train" else 10):
            (folder / f"doc_{index:03d}.txt").write_text("\n".join(sentences(12, seed=seed * 1000 + index)))
        folders.append(folder)
    return folders[0], folders[1]


def clean_and_spliced_at(
    model: HookedTransformer, tokens: torch.Tensor, sae_hook: str, sae: SAE[Any], hooks: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Activations at `hooks` of a plain forward and of one with `sae`'s reconstruction at
    `sae_hook`, by TransformerLens's run_with_cache / run_with_hooks alone (an independent check
    of sae_lens_kl's splice)."""
    _, clean = model.run_with_cache(tokens, names_filter=hooks)
    spliced: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model.run_with_hooks(
            tokens,
            fwd_hooks=[
                (sae_hook, lambda acts, hook: sae(acts)),  # noqa: ARG005
                *[(h, lambda acts, hook: spliced.__setitem__(hook.name, acts)) for h in hooks],
            ],
        )
    return dict(clean.items()), spliced


class Crash(RuntimeError):
    """What `crash_at` raises: a run stopped in the middle, as a kill would stop it."""


def crash_at(step: int) -> Any:
    """A kl_finetune callback that stops the run after its `step`-th step."""

    def callback(trainer: Any, output: Any) -> None:  # noqa: ARG001
        if trainer.n_training_steps == step:
            raise Crash(f"killed at step {step}")

    return callback
