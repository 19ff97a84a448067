"""Where the notebooks run (local, Kaggle, Colab) and the default paths that follow from it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def platform() -> str:
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or Path("/kaggle/working").is_dir():
        return "kaggle"
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    return "local"


def default_run_dir(preset: str) -> Path:
    """A writable place for outputs: Kaggle's /kaggle/working, Colab's /content, else ./outputs."""
    base = {"kaggle": Path("/kaggle/working/outputs"), "colab": Path("/content/outputs")}.get(platform(), REPO / "outputs")
    return base / f"run-{preset}"


def default_corpus_dir() -> Path:
    """LLM_CORPUS_DIR, else a Kaggle input dataset holding .txt files, else ../shared's corpus."""
    if os.environ.get("LLM_CORPUS_DIR"):
        return Path(os.environ["LLM_CORPUS_DIR"])
    if platform() == "kaggle":
        for d in sorted(Path("/kaggle/input").glob("*")):
            if any(d.rglob("*.txt")):
                return d
    return REPO.parent / "shared" / "corpus" / "pt-literature"
