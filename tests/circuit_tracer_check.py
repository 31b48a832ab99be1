"""Run by tests/test_export.py in circuit-tracer's own environment (circuit-tracer 0.5.0 pins
transformers <= 4.57.3, so it cannot share ours): circuit-tracer's loaders read our export of a
transcoder set, compute what SAELens computed (float64), and its replacement model runs an
attribution graph on a tiny random model, offline. Usage: python circuit_tracer_check.py FOLDER
(FOLDER holds `set/`, our export, and `expected.safetensors`, written by the test)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder import load_transcoder_set
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast


def main(folder: Path) -> None:
    export = (folder / "set").resolve()
    expected = load_file(str(folder / "expected.safetensors"))
    n_layers = len(list(export.glob("layer_*.safetensors")))
    cpu = torch.device("cpu")
    by_hub, config = load_transcoder_from_hub(str(export), device=cpu, dtype=torch.float64)
    by_paths = load_transcoder_set(
        {layer: str(export / f"layer_{layer}.safetensors") for layer in range(n_layers)},
        scan=config["scan"],
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        device=cpu,
        dtype=torch.float64,
    )
    report = {"layers": n_layers, "max_abs_error": 0.0}
    for transcoders in (by_hub, by_paths):
        assert len(transcoders) == n_layers
        for layer in range(n_layers):
            x = expected[f"input_{layer}"]
            with torch.no_grad():
                acts, output = transcoders[layer].encode(x), transcoders[layer](x)
            for name, ours in (("acts", acts), ("output", output)):
                error = (ours - expected[f"{name}_{layer}"]).abs().max().item()
                report["max_abs_error"] = max(report["max_abs_error"], error)

    # the replacement model on a tiny random model of the set's shape, with a local tokenizer
    # (BOS not id 0: circuit-tracer 0.5.0 skips a falsy BOS id)
    vocab = {"<unk>": 0, "<bos>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", unk_token="<unk>").save_pretrained(
            tokenizer_dir
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        d_model = by_hub[0].W_dec.shape[1]
        cfg = HookedTransformerConfig(
            n_layers=n_layers,
            d_model=d_model,
            n_ctx=32,
            d_head=8,
            n_heads=d_model // 8,
            d_mlp=64,
            d_vocab=len(vocab),
            act_fn="gelu",
            normalization_type="LN",
            device="cpu",
            seed=0,
        )
        by_hub_32, _ = load_transcoder_from_hub(str(export), device=cpu, dtype=torch.float32)
        model = ReplacementModel.from_config(cfg, by_hub_32, backend="transformerlens", tokenizer=tokenizer)
        graph = attribute("hello world", model, max_n_logits=3, batch_size=16)
    report["adjacency"] = list(graph.adjacency_matrix.shape)
    report["active_features"] = len(graph.active_features)
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
