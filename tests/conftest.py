import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus" / "pt-literature"

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

# Six short plays by Machado de Assis (166 kB, 71 k GPT-2 tokens): the smoke preset in seconds.
TINY_FILES = ["teatro/bote.txt", "teatro/naoConsultesMedico.txt", "teatro/deuses.txt",
              "teatro/aventalLuva.txt", "teatro/quaseMinistros.txt", "teatro/licaoBotanica.txt"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A copy of a few real works (tests may not write under ../shared)."""
    if not CORPUS.is_dir():
        pytest.fail(f"the shared corpus is missing at {CORPUS}; tests read it from ../shared")
    d = tmp_path_factory.mktemp("corpus")
    for rel in TINY_FILES:
        dest = d / Path(rel).name
        shutil.copyfile(CORPUS / "machado-de-assis" / rel, dest)
    return d


@pytest.fixture(scope="session")
def smoke_cfg():
    from llm_nb_utils.config import make_config
    return make_config("smoke", device="cpu")


@pytest.fixture(scope="session")
def prepared_run(tiny_corpus, tmp_path_factory) -> Path:
    """A run directory whose data/ holds the tiny corpus, prepared once for the session."""
    from llm_nb_utils.prepare import prepare_data
    run = tmp_path_factory.mktemp("run")
    prepare_data(tiny_corpus, run / "data", log=lambda *_: None)
    return run


def curve(history: list) -> list:
    """A training history without its wall-clock stamps: what two runs of the same training share."""
    return [{k: v for k, v in point.items() if k != "time_s"} for point in history]
