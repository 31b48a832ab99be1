"""What the `sae-lens-kl` subcommands do, given parsed arguments (parsing lives in cli.py, which
imports this package only to run a command): one module per family of commands."""

from sae_lens_kl.commands.analysis import circuits, export, saebench
from sae_lens_kl.commands.common import load_sae
from sae_lens_kl.commands.demo import DemoSetup, demo, demo_setup, experiment, sparsity, sweep
from sae_lens_kl.commands.finetune import cache, evaluate, finetune, train

__all__ = [
    "DemoSetup",
    "cache",
    "circuits",
    "demo",
    "demo_setup",
    "evaluate",
    "experiment",
    "export",
    "finetune",
    "load_sae",
    "saebench",
    "sparsity",
    "sweep",
    "train",
]
