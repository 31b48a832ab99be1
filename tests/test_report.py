"""Reports: JSON, Markdown table and PNG plots from real fine-tune reports."""

from __future__ import annotations

import json

from conftest import make_sae, random_tokens, tiny_model

from sae_lens_kl import kl_finetune
from sae_lens_kl.report import History, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_files(tmp_path) -> None:
    history = History()
    data = random_tokens(60, seq=16)
    options = {"tokens": 5 * 64, "lr": 1e-3, "batch_size": 4, "eval_tokens": 128}
    tuned = kl_finetune(make_sae("topk"), tiny_model(), data, callbacks=[history], **options)
    control = kl_finetune(make_sae("topk"), tiny_model(), data, loss="mse", **options)
    runs = {"KL+MSE": tuned.cfg.metadata.kl_finetune, "MSE": control.cfg.metadata.kl_finetune}
    written = write_report(tmp_path, "test", runs, history, ["a note"])
    assert [p.name for p in written] == [
        "report.json",
        "report.md",
        "training_curves.png",
        "before_after.png",
    ]
    assert len(history.rows) == 5 and history.rows[-1]["tokens"] == 5 * 64
    assert history.rows[-1]["lr"] == 0.0  # linear decay to zero
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runs"]["KL+MSE"]["after"]["kl"] == runs["KL+MSE"]["after"]["kl"]
    markdown = (tmp_path / "report.md").read_text()
    assert f"{runs['KL+MSE']['after']['kl']:.4f}" in markdown
    assert "fraction of CE gap closed" in markdown and "a note" in markdown
    for name in ("training_curves.png", "before_after.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
