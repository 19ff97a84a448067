"""GPT-2 BPE through tiktoken, usable offline.

tiktoken's ``gpt2`` encoding downloads two files; ``r50k_base`` is the same vocabulary and
merges (identical ids, ``<|endoftext|>`` = 50256) from a single ranks file, which tiktoken
reads from ``TIKTOKEN_CACHE_DIR`` without the network. We therefore load ``r50k_base``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

from .errors import SuiteError

EOT_ID = 50256
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# tiktoken names its cache files by the sha1 of the URL they came from.
R50K_CACHE_NAME = hashlib.sha1(R50K_URL.encode()).hexdigest()


class TokenizerUnavailable(SuiteError, RuntimeError):
    """The GPT-2 BPE files are neither cached nor downloadable."""


def _candidate_cache_dirs() -> list[Path]:
    """TIKTOKEN_CACHE_DIR if set, else a `shared/tiktoken_cache` beside the repository."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return [Path(os.environ["TIKTOKEN_CACHE_DIR"])]
    repo = Path(__file__).resolve().parent.parent
    return [p for p in (repo.parent / "shared" / "tiktoken_cache", repo / "shared" / "tiktoken_cache")
            if (p / R50K_CACHE_NAME).is_file()]


@lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 BPE encoding (tiktoken ``r50k_base``), offline when a cache holds its ranks."""
    try:
        import tiktoken
    except ImportError as e:
        raise TokenizerUnavailable("tiktoken is not installed: pip install tiktoken") from e
    dirs = _candidate_cache_dirs()
    if dirs and not os.environ.get("TIKTOKEN_CACHE_DIR"):
        os.environ["TIKTOKEN_CACHE_DIR"] = str(dirs[0])
    try:
        enc = tiktoken.get_encoding("r50k_base")
    except Exception as e:  # tiktoken raises requests/urllib/ValueError variants when offline
        where = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise TokenizerUnavailable(
            "cannot load the GPT-2 BPE ranks (tiktoken 'r50k_base'): no network and no cached "
            f"copy in TIKTOKEN_CACHE_DIR={where}.\nFix: on a machine with internet, download "
            f"{R50K_URL}, then either call llm_nb_utils.tokenizer.install_ranks_file(path, cache_dir) "
            f"or copy it to <cache_dir>/{R50K_CACHE_NAME} and set TIKTOKEN_CACHE_DIR=<cache_dir>.\n"
            f"(underlying error: {type(e).__name__}: {e})") from e
    if enc.n_vocab != EOT_ID + 1 or enc.eot_token != EOT_ID:
        raise TokenizerUnavailable(f"unexpected GPT-2 BPE: n_vocab={enc.n_vocab}, eot={enc.eot_token}")
    return enc


def install_ranks_file(ranks_file: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Put a downloaded ``r50k_base.tiktoken`` where tiktoken looks for it, and point to it."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / R50K_CACHE_NAME
    shutil.copyfile(ranks_file, dest)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    get_tokenizer.cache_clear()
    return dest


def encode(text: str) -> list[int]:
    """Plain text to ids; special-token strings in the text are treated as ordinary text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    return get_tokenizer().decode([int(i) for i in ids])


def pieces(text: str, show_spaces: bool = False) -> list[str]:
    """How the BPE cuts `text`: the text of each token, in order; with `show_spaces` a token's
    leading space is drawn as ␣ (GPT-2 keeps the space before a word inside the word's token). A
    character whose UTF-8 bytes fall into two tokens shows as � in each."""
    out = [decode([i]) for i in encode(text)]
    return [p.replace(" ", "␣", 1) if show_spaces and p.startswith(" ") else p for p in out]
