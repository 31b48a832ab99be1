"""Every held-out evaluation path's full result on the tiny test model, as JSON, to show that a
refactor changes no evaluation (method_digests.py does the same for what a fine-tune trains).

Evaluates SAEs of several architectures and sites with one shared HeldOutEvaluator (a TopK and a
standard SAE at one hook, a transcoder, one head of hook_z, an SAE after block 0), `evaluate`
alone (JumpReLU, first positions excluded; no prefix reuse), and the before/after evaluations of
fine-tunes whose spliced model differs from the SAE alone (LoRA on the LM after the SAE and on all
layers, an adapter). Run it at two commits and compare the outputs byte for byte:

    PYTHONPATH=<old worktree> python benchmarks/eval_digests.py > before.json
    python benchmarks/eval_digests.py > after.json && cmp before.json after.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_sae, random_tokens, tiny_model  # noqa: E402

from sae_lens_kl import kl_finetune  # noqa: E402
from sae_lens_kl.evaluation import HeldOutEvaluator, evaluate  # noqa: E402

EVALUATED = ("before", "after")


def as_json(result: object) -> dict[str, object]:
    return {**result.to_dict(), "per_sequence": result.per_sequence}  # type: ignore[attr-defined]


def fine_tune_evaluations(data: torch.Tensor, **method: object) -> dict[str, object]:
    """The before/after evaluations a 3-step fine-tune with `method` reports."""
    with tempfile.TemporaryDirectory() as folder:
        tuned = kl_finetune(
            make_sae("topk"),
            tiny_model(),
            data,
            save_dir=Path(folder) / "out",
            tokens=3 * 64,
            batch_size=4,
            eval_tokens=128,
            lr=1e-3,
            **method,  # type: ignore[arg-type]
        )
    report = tuned.cfg.metadata.kl_finetune
    return {key: report[key] for key in EVALUATED}


def main() -> None:
    torch.set_num_threads(1)
    data = random_tokens(64)
    model = tiny_model()
    shared = HeldOutEvaluator.for_data(model, data, n_tokens=256, context_size=16)
    saes = {
        "topk": make_sae("topk"),
        "standard": make_sae("standard"),
        "transcoder": make_sae("transcoder"),
        "head": make_sae("topk", hook_name="blocks.1.attn.hook_z", d_in=8, head_index=1),
        "resid_post0": make_sae("topk", hook_name="blocks.0.hook_resid_post"),
    }
    out: dict[str, object] = {name: as_json(shared(sae)) for name, sae in saes.items()}
    alone = evaluate(make_sae("jumprelu"), model, data, n_tokens=128, exclude_first_positions=2)
    out["jumprelu_alone"] = as_json(alone)
    out["no_prefix"] = as_json(evaluate(make_sae("topk"), model, data, n_tokens=128, prefix_reuse=False))
    for layers in ("after", "all"):
        out[f"lm_lora_{layers}"] = fine_tune_evaluations(data, lm_lora_rank=2, lm_lora_layers=layers)
    out["adapter"] = fine_tune_evaluations(data, adapter="linear", adapter_width=4)
    print(json.dumps(out, sort_keys=True, indent=1, default=str))


if __name__ == "__main__":
    main()
