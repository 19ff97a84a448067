"""A corpus is a directory of UTF-8 `.txt` files (searched recursively), one document each.

Reading is streaming: `scan_corpus` decodes and cleans every file once to measure it and to find
empty and duplicate documents, keeping only numbers and hashes; `read_document` re-reads one file
when it is tokenized. Peak memory is therefore one document, not the corpus.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SuiteError


class CorpusError(SuiteError, ValueError):
    """A corpus that cannot be used as given; the message says why and what to do."""


_BLANK_RUNS = re.compile(r"\n[ \t]*(?:\n[ \t]*){2,}")
_TRAILING_WS = re.compile(r"[ \t]+\n")


# What prose never looks like. A file of NUL bytes, a base64 blob or a table of numbers would be
# tokenized as happily as a novel and take its share of the training split.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_LETTER_RUNS = re.compile(r"[^\W\d_]+")
_WHITESPACE_RUNS = re.compile(r"\s+")
NO_SPACE_LIMIT = 2000          # prose has a space every few dozen characters
MIN_LETTER_SHARE = 0.5         # Portuguese literature: about 0.85 of the visible characters


def quality_problem(text: str) -> tuple[str, str] | None:
    """(status, why) when a cleaned, non-empty text is not prose; None when it is."""
    controls = len(_CONTROL.findall(text))
    if controls > max(10, len(text) // 1000):
        return "control_characters", f"{controls:,} control characters (e.g. NUL) in {len(text):,}"
    run = re.search(f"[^ \u00a0\t]{{{NO_SPACE_LIMIT}}}", text)
    if run:
        return "no_spaces", f"{NO_SPACE_LIMIT:,}+ characters without a space from character {run.start():,}"
    visible = len(text) - sum(map(len, _WHITESPACE_RUNS.findall(text)))
    letters = sum(map(len, _LETTER_RUNS.findall(text)))
    if visible and letters / visible < MIN_LETTER_SHARE:
        return "few_letters", f"letters are {letters / visible:.0%} of the visible characters"
    return None


def clean_text(text: str) -> str:
    """NFC, Unix newlines, no trailing spaces, at most one blank line in a row, trimmed."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.lstrip("\ufeff")
    text = _TRAILING_WS.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


@dataclass
class DocInfo:
    path: str          # relative to the corpus directory
    bytes: int
    chars: int = 0
    words: int = 0
    sha256: str = ""   # of the cleaned text, for duplicate detection
    status: str = "kept"   # kept | empty | duplicate | undecodable | control_characters | no_spaces | few_letters
    note: str = ""         # why, for the statuses that need it


@dataclass
class CorpusScan:
    root: str
    docs: list[DocInfo] = field(default_factory=list)
    raw_fingerprint: str = ""   # of every file's relative path and raw bytes

    @property
    def kept(self) -> list[DocInfo]:
        return [d for d in self.docs if d.status == "kept"]

    def dropped(self, status: str) -> list[str]:
        return [d.path for d in self.docs if d.status == status]

    def summary(self) -> dict:
        kept = self.kept
        return {"files": len(self.docs), "kept": len(kept),
                "bytes": sum(d.bytes for d in self.docs),
                "chars": sum(d.chars for d in kept), "words": sum(d.words for d in kept),
                "dropped_empty": self.dropped("empty"),
                "dropped_duplicate": self.dropped("duplicate"),
                "undecodable": self.dropped("undecodable"),
                "not_prose": {d.path: f"{d.status}: {d.note}" for d in self.docs if d.note}}

    def to_dict(self) -> dict:
        return {"root": self.root, "raw_fingerprint": self.raw_fingerprint,
                "docs": [asdict(d) for d in self.docs]}


def collection_of(path: str) -> str:
    """A document's collection: the top-level folder of the corpus it sits in."""
    return path.split("/")[0] if "/" in path else "(top level)"


def read_authors(root: str | Path) -> dict[str, str]:
    """Author of each document, where a folder's METADATA.tsv says it (ELTeC's table: `filename`
    and `author-name` columns); {relative path: author}. Other documents have no known author."""
    import csv
    root = Path(root)
    authors = {}
    for table in root.rglob("METADATA.tsv"):
        with open(table, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        folder = table.parent.relative_to(root).as_posix()
        for row in rows:
            if row.get("filename") and row.get("author-name"):
                rel = f"{row['filename']}.txt" if folder == "." else f"{folder}/{row['filename']}.txt"
                authors[rel] = row["author-name"].strip()
    return authors


def list_text_files(corpus_dir: str | Path) -> list[Path]:
    root = Path(corpus_dir).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus directory {str(root)!r} does not exist. Fix: pass corpus_dir= the "
                          "folder holding your .txt files (on Kaggle: /kaggle/input/<dataset>), or "
                          "use corpus_source='gutenberg' to download one.")
    if not root.is_dir():
        raise CorpusError(f"corpus path {str(root)!r} is a file, not a directory of .txt files.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".txt")
    if not files:
        raise CorpusError(f"no .txt files under {str(root)!r}. The corpus must be plain-text "
                          "UTF-8 files with a .txt extension (searched recursively).")
    return files


def read_document(path: Path) -> str:
    """One file, decoded as strict UTF-8 (a BOM is tolerated) and cleaned."""
    return clean_text(path.read_bytes().decode("utf-8"))


def scan_corpus(corpus_dir: str | Path, allow_undecodable: bool = False) -> CorpusScan:
    """Measure every document and mark the empty, duplicate and undecodable ones."""
    root = Path(corpus_dir).expanduser()
    files = list_text_files(root)
    scan = CorpusScan(root=str(root.resolve()))
    fp = hashlib.sha256()
    seen: set[str] = set()
    for path in files:
        raw = path.read_bytes()
        rel = path.relative_to(root).as_posix()
        fp.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
        info = DocInfo(path=rel, bytes=len(raw))
        try:
            text = clean_text(raw.decode("utf-8"))
        except UnicodeDecodeError:
            info.status = "undecodable"
            scan.docs.append(info)
            continue
        info.chars, info.words = len(text), len(text.split())
        info.sha256 = hashlib.sha256(text.encode()).hexdigest()
        problem = quality_problem(text) if text else None
        if not text:
            info.status = "empty"
        elif info.sha256 in seen:
            info.status = "duplicate"
        elif problem:
            info.status, info.note = problem
        seen.add(info.sha256)
        scan.docs.append(info)
    scan.raw_fingerprint = fp.hexdigest()

    bad = scan.dropped("undecodable")
    if bad and not allow_undecodable:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise CorpusError(f"{len(bad)} file(s) are not valid UTF-8:\n  {shown}\nFix: convert them "
                          "(e.g. iconv -f latin1 -t utf-8), remove them, or pass "
                          "allow_undecodable=True to skip them.")
    if not scan.kept:
        raise CorpusError(f"the corpus at {str(root)!r} has no usable text: {len(files)} file(s), all "
                          "empty, duplicate, undecodable or not prose (control characters, no spaces, few letters).")
    return scan
