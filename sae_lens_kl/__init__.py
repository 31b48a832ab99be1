"""KL+MSE fine-tuning of SAELens sparse autoencoders through TransformerLens hook points."""

from sae_lens_kl.api import kl_finetune
from sae_lens_kl.architectures import UnsupportedSAEError, to_inference_sae, to_training_sae
from sae_lens_kl.cache import CleanPassCache, build_cache
from sae_lens_kl.config import KLFinetuneConfig
from sae_lens_kl.data import DataError
from sae_lens_kl.evaluate import EvalResult, evaluate
from sae_lens_kl.models import load_model
from sae_lens_kl.train import train_with_kl_phase
from sae_lens_kl.trainer import KLFinetuneTrainer, NonFiniteLossError

__all__ = [
    "CleanPassCache",
    "DataError",
    "EvalResult",
    "KLFinetuneConfig",
    "KLFinetuneTrainer",
    "NonFiniteLossError",
    "UnsupportedSAEError",
    "build_cache",
    "evaluate",
    "kl_finetune",
    "load_model",
    "to_inference_sae",
    "to_training_sae",
    "train_with_kl_phase",
]
