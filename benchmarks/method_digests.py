"""A digest of every method's result on the tiny test model, to show a refactor changes no result.

Runs each way of training "what replaces the activation" (the SAE fine-tune under every loss,
LoRA on the SAE, both adapters, LoRA on the LM after the SAE and on all layers, a transcoder,
two and three SAEs per pass, a clean-pass cache) for a few steps on tests/conftest.py's tiny
random model and prints one sha256 per method over every tensor it saved (the SAE's weights, an
adapter's, LM LoRA's). Run it before and after a change and compare:

    python benchmarks/method_digests.py > before.txt   # at the old commit
    python benchmarks/method_digests.py > after.txt && diff before.txt after.txt

Equal digests mean `torch.equal` results (every tensor bit for bit).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_sae, random_tokens, tiny_model  # noqa: E402

from sae_lens_kl import kl_finetune  # noqa: E402
from sae_lens_kl.cache import build_cache  # noqa: E402
from sae_lens_kl.config import LOSS_MODES  # noqa: E402

SEQ, BATCH, STEPS = 16, 4, 3
OPTIONS: dict[str, Any] = {"tokens": STEPS * BATCH * SEQ, "batch_size": BATCH, "eval_tokens": 0, "lr": 1e-3}


def digest(folder: Path) -> str:
    """sha256 over every tensor of every .safetensors file under `folder` (checkpoints excluded)."""
    sha = hashlib.sha256()
    for file in sorted(folder.rglob("*.safetensors")):
        if "checkpoints" in file.parts or file.name == "sparsity.safetensors":
            continue
        for name, tensor in sorted(load_file(file).items()):
            sha.update(f"{file.relative_to(folder)}:{name}".encode())
            sha.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def methods(data: torch.Tensor, work: Path) -> dict[str, Callable[[Path], Any]]:
    def one(**options: Any) -> Callable[[Path], Any]:
        settings = {**OPTIONS, **options}
        return lambda out: kl_finetune(make_sae("topk"), tiny_model(), data, save_dir=out, **settings)

    def several(n: int) -> Callable[[Path], Any]:
        hooks = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.0.hook_resid_post"][:n]
        saes = [make_sae("topk", hook_name=hook, seed=i + 1) for i, hook in enumerate(hooks)]
        return lambda out: kl_finetune(saes, tiny_model(), data, save_dir=out, **OPTIONS)

    def cached(out: Path) -> Any:
        model = tiny_model()
        cache = build_cache(
            model, data, "blocks.1.hook_resid_pre", work / "cache", tokens=len(data) * SEQ, context_size=SEQ
        )
        return kl_finetune(make_sae("topk"), model, cache, save_dir=out, **OPTIONS)

    def transcoder(out: Path) -> Any:
        return kl_finetune(make_sae("transcoder"), tiny_model(), data, save_dir=out, **OPTIONS)

    return {
        **{f"loss={loss}": one(loss=loss) for loss in LOSS_MODES},
        "sae_lora_rank=2": one(sae_lora_rank=2),
        "adapter=linear": one(adapter="linear", adapter_width=4),
        "adapter=mlp": one(adapter="mlp", adapter_width=4),
        "lm_lora after": one(lm_lora_rank=2, loss="kl"),
        "lm_lora all": one(lm_lora_rank=2, lm_lora_layers="all", loss="kl"),
        "transcoder": transcoder,
        "2 SAEs per pass": several(2),
        "3 SAEs per pass": several(3),
        "clean-pass cache": cached,
    }


def main() -> None:
    torch.set_num_threads(1)
    data = random_tokens(STEPS * BATCH + 8, seq=SEQ)
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in methods(data, Path(tmp)).items():
            out = Path(tmp) / name.replace(" ", "_").replace("=", "_")
            run(out)
            print(f"{name:20s} {digest(out)}", flush=True)


if __name__ == "__main__":
    main()
