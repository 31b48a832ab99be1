"""KL+MSE fine-tuning of SAELens sparse autoencoders through TransformerLens hook points.

Names load on first use (PEP 562), so `sae-lens-kl --help` parses without importing torch,
SAELens or TransformerLens.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_MODULE_OF = {
    "CleanPassCache": "cache",
    "DataError": "data",
    "EvalResult": "eval_result",
    "HeldOutEvaluator": "evaluation",
    "KLFinetuneConfig": "config",
    "KLFinetuneTrainer": "trainer",
    "NonFiniteLossError": "trainer",
    "UnsupportedSAEError": "architectures",
    "build_cache": "cache",
    "evaluate": "evaluation",
    "evaluate_saebench": "saebench",
    "kl_finetune": "api",
    "load_model": "models",
    "to_inference_sae": "architectures",
    "to_training_sae": "architectures",
    "train_with_kl_phase": "train",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'sae_lens_kl' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sae_lens_kl.{_MODULE_OF[name]}"), name)
