"""The config round-trips and validates."""

from __future__ import annotations

import json

import pytest

from sae_lens_kl import KLFinetuneConfig


def test_config_round_trips_through_json() -> None:
    cfg = KLFinetuneConfig(tokens=1000, loss="kl", lr=1e-4, target_l0=12.5, checkpoint_every_tokens=100)
    again = KLFinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("loss", "kl-only", "loss='kl-only'"),
        ("tokens", 0, "tokens=0"),
        ("batch_size", -1, "batch_size=-1"),
        ("lr", 0.0, "lr=0.0"),
        ("controller_rate", 1.5, "controller_rate"),
        ("context_size", 1, "context_size=1"),
        ("sparsity_controller", "yes", "sparsity_controller='yes'"),
    ],
)
def test_bad_values_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KLFinetuneConfig(**{"tokens": 1000, field: value})


def test_unknown_fields_are_named() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        KLFinetuneConfig.from_dict({"tokens": 5, "learning_rate": 1.0})
