"""Portuguese books from Project Gutenberg: catalog -> UTF-8 plain text -> stripped, cached files.

The result is an ordinary corpus directory (one `pg<id>.txt` per book, license header and footer
removed), so data preparation treats it like any local corpus. Every download goes through a
temporary file renamed only when complete (`files.write_atomic`), so an interrupted run never leaves
a truncated book that a re-run would take for a finished one; a re-run downloads only what is missing.
"""
from __future__ import annotations

import csv
import http.client
import io
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import SuiteError
from .files import write_atomic

GUTENBERG_BASE_URL = "https://www.gutenberg.org"
CATALOG_PATH = "/cache/epub/feeds/pg_catalog.csv"
BOOK_PATH = "/cache/epub/{id}/pg{id}.txt"
USER_AGENT = "llm-nb-utils/0.1 (+https://github.com/; research corpus builder)"


class GutenbergError(SuiteError, RuntimeError):
    pass


class _NotFound(Exception):
    pass


# Header/footer markers, modern and older variants ("THIS" / "THE", "EBOOK" / "E-BOOK", ...).
_START = re.compile(r"^\s*\*{3}\s*START OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$"
                    r"|^\s*\*END\*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\s*\*{3}\s*END OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$"
                  r"|^\s*End of (?:the )?Project Gutenberg(?:'s)? .*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg_boilerplate(text: str) -> str:
    """The book's own text: everything between the START and END markers (when present)."""
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\r\n")


@dataclass
class CatalogEntry:
    id: int
    title: str
    authors: str


def parse_catalog(csv_text: str, language: str = "pt") -> list[CatalogEntry]:
    """Text books whose Language field lists `language` (the field may hold several, '; '-separated)."""
    reader = csv.DictReader(io.StringIO(csv_text))
    needed = {"Text#", "Type", "Language", "Title"}
    if not reader.fieldnames or not needed <= set(reader.fieldnames):
        raise GutenbergError(f"the Gutenberg catalog has unexpected columns {reader.fieldnames}; "
                             f"expected at least {sorted(needed)}")
    out = []
    for row in reader:
        langs = {x.strip() for x in (row.get("Language") or "").split(";")}
        if row.get("Type") == "Text" and language in langs:
            try:
                out.append(CatalogEntry(int(row["Text#"]), row["Title"], row.get("Authors", "")))
            except ValueError:
                continue
    return out


def fetch(url: str, retries: int = 3, backoff: float = 1.0, timeout: float = 30.0,
          sleep: Callable[[float], None] = time.sleep) -> bytes:
    """GET with retries and exponential backoff on network errors and 5xx; 404 is final."""
    last = None
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read()
                expected = resp.headers.get("Content-Length")
                if expected is not None and int(expected) != len(data):
                    raise urllib.error.URLError(f"truncated body ({len(data)} of {expected} bytes)")
                return data
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise _NotFound(url) from e
            last = e
            if e.code < 500 and e.code != 429:
                break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last = e   # connection refused/reset, timeout, truncated body: all worth a retry
        if attempt < retries:
            sleep(backoff * 2 ** attempt)
    raise GutenbergError(f"could not download {url} after {retries + 1} attempt(s): {last}. "
                         "Fix: check the network (Kaggle: Settings > Internet on), or use a local "
                         "corpus with corpus_source='local' and corpus_dir=<folder of .txt files>.")


def download_portuguese_corpus(cache_dir: str | Path, target_mb: float = 50.0,
                               base_url: str = GUTENBERG_BASE_URL, language: str = "pt",
                               retries: int = 3, backoff: float = 1.0,
                               log: Callable[[str], None] = print,
                               sleep: Callable[[float], None] = time.sleep) -> Path:
    """Fill `cache_dir/books` with stripped books until their text reaches `target_mb` MB.

    Returns the books directory, a corpus directory for `prepare_data`.
    """
    cache_dir = Path(cache_dir).expanduser()
    books_dir = cache_dir / "books"
    books_dir.mkdir(parents=True, exist_ok=True)
    catalog_file = cache_dir / "pg_catalog.csv"
    if not catalog_file.exists():
        log(f"downloading the Gutenberg catalog from {base_url}{CATALOG_PATH}")
        write_atomic(catalog_file, fetch(base_url + CATALOG_PATH, retries, backoff, sleep=sleep))
    entries = parse_catalog(catalog_file.read_text(encoding="utf-8"), language)
    if not entries:
        raise GutenbergError(f"the catalog lists no text books in language {language!r}")

    target = int(target_mb * 1e6)
    total, downloaded, missing, failed = 0, 0, [], []
    for entry in sorted(entries, key=lambda e: e.id):
        if total >= target:
            break
        book = books_dir / f"pg{entry.id}.txt"
        if not book.exists():
            try:
                raw = fetch(base_url + BOOK_PATH.format(id=entry.id), retries, backoff, sleep=sleep)
                text = strip_gutenberg_boilerplate(raw.decode("utf-8"))
            except (_NotFound, UnicodeDecodeError):
                missing.append(entry.id)   # no UTF-8 plain text for this book: skip it
                continue
            except GutenbergError:
                failed.append(entry.id)    # retries exhausted for this one book: the others may still come
                continue
            write_atomic(book, text.encode("utf-8"))
            downloaded += 1
        total += book.stat().st_size
    if failed and not total:
        raise GutenbergError(f"no book could be downloaded from {base_url} ({len(failed)} failed after {retries + 1} "
                             "attempts each). Fix: check the network (Kaggle: Settings > Internet on), or use a "
                             "local corpus with corpus_source='local' and corpus_dir=<folder of .txt files>.")
    log(f"Gutenberg ({language}): {len(list(books_dir.glob('*.txt')))} books, {total / 1e6:.1f} MB "
        f"in {books_dir} ({downloaded} downloaded now, {len(missing)} without a UTF-8 plain-text file"
        + (f", {len(failed)} failed after retries and left for a re-run: {failed[:10]}" if failed else "") + ")")
    if total < target:
        log(f"note: the catalog holds only {total / 1e6:.1f} MB of {language!r} text, "
            f"below the {target_mb} MB asked for")
    return books_dir
