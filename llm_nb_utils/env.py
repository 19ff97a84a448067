"""Where the notebooks run (local, Kaggle, Colab) and the defaults that follow from it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import ConfigError

REPO = Path(__file__).resolve().parent.parent
# A clone has notebooks/ beside the package; a pip-installed package carries them inside itself.
IS_CHECKOUT = (REPO / "notebooks").is_dir()
NOTEBOOK_DIR = REPO / "notebooks" if IS_CHECKOUT else Path(__file__).resolve().parent / "notebooks"
SHARED_CORPUS = REPO.parent / "shared" / "corpus" / "pt-literature"


def platform() -> str:
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or Path("/kaggle/working").is_dir():
        return "kaggle"
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    return "local"


def default_run_dir(preset: str) -> Path:
    """A writable place for outputs: Kaggle's /kaggle/working, Colab's /content, else the clone's
    outputs/ (or ./outputs when the package is pip-installed)."""
    local = REPO / "outputs" if IS_CHECKOUT else Path.cwd() / "outputs"
    base = {"kaggle": Path("/kaggle/working/outputs"), "colab": Path("/content/outputs")}.get(platform(), local)
    return base / f"run-{preset}"


def _kaggle_input_corpus() -> Path | None:
    for d in sorted(Path("/kaggle/input").glob("*")):
        if any(d.rglob("*.txt")):
            return d
    return None


def resolve_corpus(source: str = "auto", corpus_dir: str | Path = "") -> tuple[str, Path | None, str]:
    """(source, folder of .txt files or None for a Gutenberg download, why).

    `auto` takes the first local corpus it finds: `corpus_dir`, LLM_CORPUS_DIR, a Kaggle input
    dataset holding .txt files, the shared corpus beside the repository; with none (Colab, a fresh
    machine) it downloads Portuguese books from Project Gutenberg.
    """
    if source not in ("auto", "local", "gutenberg"):
        raise ConfigError(f"corpus_source must be auto, local or gutenberg (got {source!r})")
    if source == "gutenberg":
        return "gutenberg", None, "corpus_source='gutenberg'"
    if corpus_dir:
        return "local", Path(corpus_dir), "corpus_dir"
    if os.environ.get("LLM_CORPUS_DIR"):
        return "local", Path(os.environ["LLM_CORPUS_DIR"]), "LLM_CORPUS_DIR"
    if platform() == "kaggle" and (found := _kaggle_input_corpus()) is not None:
        return "local", found, "a Kaggle input dataset holding .txt files"
    if SHARED_CORPUS.is_dir() or source == "local":
        # With source='local' and nothing found, the corpus reader names the missing folder and the fix.
        return "local", SHARED_CORPUS, "the shared corpus beside the repository"
    return "gutenberg", None, ("no local corpus (no corpus_dir, LLM_CORPUS_DIR, Kaggle input dataset or "
                               "shared corpus), so Portuguese books are downloaded from Project Gutenberg")

