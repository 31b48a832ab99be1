"""The SAELens behaviour this package relies on where SAELens has no public seam (sae-lens 6.54).
Each test fails loudly if a SAELens release changes it; the code that relies on it says so."""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import sae_lens
import torch
from conftest import make_sae, random_tokens, tiny_model
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_kl.architectures import to_training_sae
from sae_lens_kl.config import TRAINING_ARCHITECTURES, KLFinetuneConfig
from sae_lens_kl.data import batched
from sae_lens_kl.multi import MultiKLFinetuneTrainer
from sae_lens_kl.runs import SpliceRunner, shared_clean_runs
from sae_lens_kl.splice import HookSite
from sae_lens_kl.train import fresh_sae, runner_config
from sae_lens_kl.trainer import KLFinetuneTrainer, _firing_counts

SEQ, BATCH, STEPS = 16, 4, 3


class RecordingTrainer(KLFinetuneTrainer):
    """Records the order in which SAETrainer.fit (or MultiSAETrainer.fit) calls our overrides."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, int]] = []
        self.postfixes: list[str] = []

    def step(self, batch: Any) -> TrainStepOutput:
        self.events.append(("step", self.n_training_steps))
        return super().step(batch)

    def _checkpoint_if_needed(self) -> None:
        self.events.append(("checkpoint", self.n_training_steps))
        super()._checkpoint_if_needed()

    def _update_pbar(self, step_output: TrainStepOutput, pbar: Any, update_interval: int = 1) -> None:
        self.events.append(("progress", self.n_training_steps))
        super()._update_pbar(step_output, pbar, update_interval)
        self.postfixes.append(str(pbar.postfix))


def recording_trainer(model: Any, hook_name: str, runs: Any, **options: Any) -> RecordingTrainer:
    sae = to_training_sae(make_sae("topk", hook_name=hook_name))
    cfg = KLFinetuneConfig(tokens=STEPS * BATCH * SEQ, batch_size=BATCH, context_size=SEQ, **options)
    runner = SpliceRunner(model, HookSite.for_model(model, hook_name, None))
    return RecordingTrainer(sae, runner, runs(runner), cfg, context_size=SEQ)


def expected_events() -> list[tuple[str, int]]:
    # Per iteration: the step, then the checkpoint hook before n_training_steps advances (so a
    # checkpoint's saved step count is one behind: KLFinetuneTrainer.load_trainer_state), then the
    # progress bar after it advances (where KLFinetuneTrainer fires the user's callbacks).
    return [
        event
        for step in range(STEPS)
        for event in (("step", step), ("checkpoint", step), ("progress", step + 1))
    ]


def test_sae_trainer_fit_calls_step_checkpoint_then_progress() -> None:
    model = tiny_model()
    batches = batched(random_tokens(STEPS * BATCH, seq=SEQ), BATCH)
    trainer = recording_trainer(model, "blocks.1.hook_resid_pre", lambda runner: runner.clean_runs(batches))
    trainer.fit()
    assert trainer.events == expected_events()


def test_progress_bar_shows_only_the_numbers_the_objective_has() -> None:
    model = tiny_model()
    shown = {}
    for loss in ("kl+mse", "kl+mse-fixed", "mse"):
        batches = batched(random_tokens(STEPS * BATCH, seq=SEQ), BATCH)
        trainer = recording_trainer(
            model, "blocks.1.hook_resid_pre", lambda runner, b=batches: runner.clean_runs(b), loss=loss
        )
        trainer.fit()
        shown[loss] = trainer.postfixes[-1]
    assert "alpha=" in shown["kl+mse"] and "kl=" in shown["kl+mse"]
    assert "alpha=" not in shown["kl+mse-fixed"] and "kl=" in shown["kl+mse-fixed"]
    assert "alpha=" not in shown["mse"] and "kl=" not in shown["mse"] and "mse=" in shown["mse"]
    assert not any("nan" in postfix for postfix in shown.values())


def test_multi_sae_trainer_drives_the_trainers_put_in_its_place() -> None:
    # MultiKLFinetuneTrainer replaces the plain SAETrainers MultiSAETrainer builds with ours; its fit
    # must call our step (with each SAE's batch) and advance our step counts, and its checkpoint
    # hook and progress bar (overridden) reach our checkpoints and the user's callbacks.
    model = tiny_model()
    hooks = {"a": "blocks.1.hook_resid_pre", "b": "blocks.2.hook_resid_pre"}
    trainers = {name: recording_trainer(model, hook, lambda _: iter(())) for name, hook in hooks.items()}
    batches = batched(random_tokens(STEPS * BATCH, seq=SEQ), BATCH)
    runs = shared_clean_runs(model, batches, {name: trainer.runner for name, trainer in trainers.items()})
    called: dict[str, int] = {}
    for name, trainer in trainers.items():
        trainer.callbacks.append(lambda _, __, name=name: called.__setitem__(name, called.get(name, 0) + 1))
    MultiKLFinetuneTrainer(trainers, runs).fit()
    for trainer in trainers.values():
        assert trainer.events == [event for event in expected_events() if event[0] != "progress"]
        assert trainer.n_training_samples == STEPS * BATCH * SEQ
    assert called == {"a": STEPS, "b": STEPS}


def test_fresh_sae_has_the_metadata_the_runner_would_record() -> None:
    # train.fresh_sae calls LanguageModelSAETrainingRunner._set_sae_metadata (private; run() sets
    # the metadata only inside itself).
    model = tiny_model()
    cfg: LanguageModelSAERunnerConfig[Any] = runner_config(
        model,
        "blocks.1.hook_resid_pre",
        architecture="topk",
        d_sae=64,
        k=4,
        tokens=1024,
        context_size=SEQ,
        lr=1e-3,
        batch_tokens=64,
        sink_positions=0,
        dataset_name="tokens",
    )
    sae = fresh_sae(cfg, model, random_tokens(8, seq=SEQ))
    metadata = sae.cfg.metadata
    assert (metadata.hook_name, metadata.model_name, metadata.context_size) == (
        "blocks.1.hook_resid_pre",
        model.cfg.model_name,
        SEQ,
    )


def test_trainable_architectures_are_in_sae_lens_training_registry() -> None:
    assert set(TRAINING_ARCHITECTURES) <= set(SAE_TRAINING_CLASS_REGISTRY)


def test_record_firing_keeps_sae_lens_own_counters() -> None:
    # KLFinetuneTrainer._record_firing replaces the counter updates inside SAETrainer._train_step
    # (dead latents, firing frequencies; no seam of their own): the same feature activations must
    # leave every counter where SAELens's own step leaves it.
    sae = to_training_sae(make_sae("topk"))
    rows = 24
    acts = torch.randn(2, rows, sae.cfg.d_in, generator=torch.Generator().manual_seed(3)) * 4
    theirs = SAETrainer(
        SAETrainerConfig(
            total_training_samples=2 * rows,
            train_batch_size_samples=rows,
            lr_end=3e-4,
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae,
        data_provider=iter(()),
    )
    model = tiny_model()
    ours = recording_trainer(model, sae.cfg.metadata.hook_name, lambda _: iter(()))
    for batch in acts:
        feature_acts = theirs._train_step(sae, batch).feature_acts.detach()
        ours._record_firing(_firing_counts(feature_acts), rows)
    assert ours.n_frac_active_samples == theirs.n_frac_active_samples
    torch.testing.assert_close(ours.act_freq_scores.float(), theirs.act_freq_scores, rtol=0, atol=0)
    torch.testing.assert_close(
        ours.n_forward_passes_since_fired.float(), theirs.n_forward_passes_since_fired, rtol=0, atol=0
    )
    assert 0 < int((theirs.n_forward_passes_since_fired == 0).sum()) < sae.cfg.d_sae  # some fired


# The source of SAETrainer._train_step in the SAELens release KLFinetuneTrainer._train_step mirrors
# (its order: training forward pass, firing counters, backward, clipping, optimizer, schedulers).
MIRRORED_TRAIN_STEP = ("6.54.12", "f609adeefc260444")


def test_train_step_override_mirrors_this_sae_lens_release() -> None:
    digest = hashlib.sha256(inspect.getsource(SAETrainer._train_step).encode()).hexdigest()[:16]
    version, expected = MIRRORED_TRAIN_STEP
    assert digest == expected, (
        f"SAETrainer._train_step differs from sae-lens {version}'s (installed: {sae_lens.__version__}); "
        "review KLFinetuneTrainer._train_step and _record_firing against it, then update "
        "MIRRORED_TRAIN_STEP."
    )


def test_mixing_buffer_holds_n_batches_in_buffer_sequences() -> None:
    """sae-lens 6.54's ActivationsStore shuffles n_batches_in_buffer x context activations (not x
    store_batch_size_prompts, as its config's n_tokens_per_buffer says): runner_config passes the
    sequences it wants mixed (train.mixing_buffer_sequences). Counted here as the LM batches read
    before the first training batch is served."""
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    context, prompts, buffer_batches = 16, 2, 8
    model = tiny_model()
    dataset = Dataset.from_dict({"tokens": random_tokens(64, context, seed=1).tolist()})
    store = ActivationsStore(
        model=model,
        dataset=dataset,
        streaming=False,
        hook_name="blocks.0.hook_resid_post",
        hook_head_index=None,
        context_size=context,
        d_in=model.cfg.d_model,
        n_batches_in_buffer=buffer_batches,
        total_training_tokens=64 * context,
        store_batch_size_prompts=prompts,
        train_batch_size_tokens=context,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    reads = 0
    read = store.get_raw_llm_batch

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return read(*args, **kwargs)

    store.get_raw_llm_batch = counted  # type: ignore[method-assign]
    next(store)
    # buffer_batches sequences of `context` activations, read `prompts` sequences at a time
    assert reads == buffer_batches // prompts


def test_runner_config_mixes_the_recipes_sequences() -> None:
    from sae_lens_kl.train import MIXING_BUFFER_SEQUENCES, mixing_buffer_sequences

    # the demo's MSE phase: 184,320 tokens of 128 (2 left out), batches of 512 tokens
    assert mixing_buffer_sequences(184_320, 128, 2, 512) == MIXING_BUFFER_SEQUENCES
    # a run shorter than the buffer mixes its own sequences; never less than one training batch
    assert mixing_buffer_sequences(2_048, 32, 0, 256) == 64
    assert mixing_buffer_sequences(512, 32, 2, 512) == 18


def test_the_recipes_l1_coefficient_reaches_saelens_where_the_architecture_has_one() -> None:
    import dataclasses

    from sae_lens_kl.recipes import DEMO_MSE_RECIPE

    model = tiny_model()
    for architecture, expected in (("standard", 7.5), ("topk", None)):
        recipe = dataclasses.replace(DEMO_MSE_RECIPE, architecture=architecture, l1_coefficient=7.5)
        cfg = recipe.runner_config(model, "blocks.0.hook_resid_pre", dataset_name="unused")
        # SAELens's standard SAE takes the recipe's penalty (not its default 1.0); TopK has none
        assert getattr(cfg.sae, "l1_coefficient", None) == expected
