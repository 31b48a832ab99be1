"""What several subcommands share: loading an SAE by folder or RELEASE:SAE_ID, output folders
that are never another command's, the demo's text, named SAEs."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from sae_lens_kl.corpus import django_docs
from sae_lens_kl.report import METRICS_FILENAME
from sae_lens_kl.save_dir import holds_nothing

SINK_NOTE = (
    "Positions excluded from SAE training, splicing and every metric: special tokens (BOS/EOS/PAD, "
    "as SAELens excludes them) and the first {n} positions of each sequence (an attention sink: in "
    "SmolLM2 their residual norms are ~100x the rest; in Gemma-3-270m only BOS's is)."
)


def load_sae(spec: str, device: str = "cpu") -> SAE[Any]:
    """An SAE from a local SAELens folder or RELEASE:SAE_ID (the hub); an unknown release or id
    is an error listing close matches."""
    if Path(spec).expanduser().is_dir():
        try:
            return SAE.load_from_disk(Path(spec).expanduser(), device=device)
        except Exception as error:  # noqa: BLE001 (any failure to read the folder is the folder's)
            raise SystemExit(
                f"--sae {spec}: cannot load the SAE folder ({type(error).__name__}: {str(error)[:200]}); "
                "pass a folder saved by SAELens (cfg.json with a known architecture and matching "
                "sae_weights.safetensors)."
            ) from error
    if spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists():
        raise SystemExit(f"--sae {spec}: no SAE folder there (a folder with cfg.json and the weights).")
    if ":" not in spec:
        raise SystemExit(f"--sae {spec!r} is neither a local SAE folder nor RELEASE:SAE_ID.")
    release, sae_id = spec.split(":", 1)
    directory = get_pretrained_saes_directory()
    if release not in directory and "/" not in release:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.4)
        raise SystemExit(f"Unknown SAELens release {release!r}. Close matches: {close}.")
    if release in directory and sae_id not in directory[release].saes_map:
        close = difflib.get_close_matches(sae_id, list(directory[release].saes_map), n=5, cutoff=0.4)
        raise SystemExit(f"Unknown sae_id {sae_id!r} in release {release!r}. Close matches: {close}.")
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as error:  # noqa: BLE001 (offline, a damaged cache: the user's to fix)
        raise SystemExit(
            f"--sae {spec}: cannot load it ({type(error).__name__}: {str(error)[:200]}). Offline, "
            "it must be in the Hugging Face cache (HF_HUB_OFFLINE=1), or pass a local SAE folder."
        ) from error


def check_out(out: str | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SystemExit(f"--out {path} is a file; pass a folder.")
    if not holds_nothing(path) and not overwrite:
        raise SystemExit(f"Output folder {path} exists and is not empty; pass --overwrite or another --out.")
    return path


def report_of_another_command(out: Path, own_title: str) -> str | None:
    """What in `out` another command wrote that a report there would replace, or None: a
    fine-tune's artifact, or a report whose title is not `own_title`."""
    if (out / METRICS_FILENAME).is_file() or (out / "cfg.json").is_file():
        return "a fine-tuned SAE and its report"
    report = out / "report.md"
    if report.is_file() and not (title := report.read_text()).startswith(own_title):
        return f"another command's report ({title.splitlines()[0] if title else 'empty'})"
    if (out / "report.json").is_file() and not report.is_file():
        return "another command's report.json"
    return None


def text_or_corpus(data: str | None, eval_data: str | None) -> tuple[Any, Any]:
    """(training, held-out) text: the given ones, the Django docs corpus for those not given."""
    if data is not None and eval_data is not None:
        return data, eval_data
    corpus = django_docs()
    return data or corpus.train, eval_data or corpus.eval


def named_saes(specs: list[str]) -> list[tuple[str, str]]:
    """NAME=SPEC pairs; a lone kl_finetune folder brings its starting SAE (its report's start_sae)."""
    if not specs:
        raise SystemExit(
            "saebench needs at least one --sae NAME=PATH_OR_RELEASE:SAE_ID, e.g. --sae before=out/."
        )
    named = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise SystemExit(f"--sae {spec!r}: write NAME=PATH_OR_RELEASE:SAE_ID, e.g. --sae after={spec}.")
        named.append((name, source))
    if len(set(name for name, _ in named)) != len(named):
        raise SystemExit(f"--sae names must differ: {[name for name, _ in named]}.")
    if len(named) == 1:
        metrics = Path(named[0][1]).expanduser() / METRICS_FILENAME
        start = json.loads(metrics.read_text()).get("start_sae") if metrics.is_file() else None
        if start is None:
            raise SystemExit(
                f"--sae {specs[0]} alone: give a second SAE to compare with (e.g. --sae before=...); "
                "only a folder kl_finetune wrote with its starting SAE recorded brings its own."
            )
        named.insert(0, ("before" if named[0][0] != "before" else "start", start))
    return named
