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


class CorpusError(ValueError):
    """A corpus that cannot be used as given; the message says why and what to do."""


_BLANK_RUNS = re.compile(r"\n[ \t]*(?:\n[ \t]*){2,}")
_TRAILING_WS = re.compile(r"[ \t]+\n")


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
    status: str = "kept"   # kept | empty | duplicate | undecodable


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
                "undecodable": self.dropped("undecodable")}

    def to_dict(self) -> dict:
        return {"root": self.root, "raw_fingerprint": self.raw_fingerprint,
                "docs": [asdict(d) for d in self.docs]}


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
        if not text:
            info.status = "empty"
        elif info.sha256 in seen:
            info.status = "duplicate"
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
                          "empty, duplicate or undecodable.")
    return scan
