"""Corpus -> 80/10/10 split -> GPT-2 tokens in flat uint16 files (`train.bin`, `val.bin`, `test.bin`).

`meta.json` is written last and holds a fingerprint of the inputs and settings: its presence with a
matching fingerprint is what "already prepared" means, so an interrupted run is rebuilt and a
re-run with the same inputs is free.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from .config import ConfigError
from .corpus import CorpusScan, collection_of, read_authors, read_document, scan_corpus
from .files import (DamagedFileError, StorageError, check_writable, free_bytes, os_error_in, read_json, storage_error,
                    temp_path, write_json)
from .errors import MissingRunFile
from .lock import folder_lock
from .memory import peak_rss_mb, reset_peak_rss
from .tokenizer import EOT_ID, encode

SPLITS = ("train", "val", "test")
PREP_VERSION = 3   # bump when cleaning/splitting changes, so old token files are rebuilt (2: not-prose drops, bytes; 3: composition)
# uint16 token files take about 0.8 byte per byte of Portuguese text (the shared corpus: 52.3 MB of
# text, 19.9 M GPT-2 tokens, 39.8 MB of tokens); 1.0 leaves a margin for other languages.
TOKEN_BYTES_PER_TEXT_BYTE = 1.0


def _fingerprint(scan: CorpusScan, split_method: str, ratios, seed: int) -> str:
    settings = json.dumps({"version": PREP_VERSION, "split_method": split_method,
                           "ratios": list(ratios), "seed": seed if split_method == "documents" else None,
                           "tokenizer": "r50k_base"}, sort_keys=True)
    return hashlib.sha256((scan.raw_fingerprint + settings).encode()).hexdigest()


def _plan_proportional(scan: CorpusScan, ratios):
    """Cut the concatenated text at 80% and 90% of its characters, as the study did."""
    total = sum(d.chars for d in scan.kept)
    bounds = [round(total * ratios[0]), round(total * (ratios[0] + ratios[1])), total]
    plan, offset = [], 0
    for d in scan.kept:
        pieces, start = [], 0
        for split, bound in zip(SPLITS, bounds):
            end = min(d.chars, max(0, bound - offset))
            if end > start:
                pieces.append((split, start, end))
                start = end
        plan.append((d, pieces))
        offset += d.chars
    return plan


def _plan_documents(scan: CorpusScan, ratios, seed: int):
    """Whole documents, shuffled with `seed`, assigned to splits by cumulative characters."""
    docs = list(scan.kept)
    random.Random(seed).shuffle(docs)
    total = sum(d.chars for d in docs)
    cuts = [total * ratios[0], total * (ratios[0] + ratios[1])]
    plan, offset = [], 0
    for d in docs:
        mid = offset + d.chars / 2   # a document goes where its middle falls
        split = SPLITS[0] if mid < cuts[0] else SPLITS[1] if mid < cuts[1] else SPLITS[2]
        plan.append((d, [(split, 0, d.chars)]))
        offset += d.chars
    return plan


def prepare_data(corpus_dir: str | Path, data_dir: str | Path, split_method: str = "proportional",
                 ratios=(0.8, 0.1, 0.1), seed: int = 123, allow_undecodable: bool = False,
                 source: str = "local", force: bool = False, log=print) -> dict:
    """Tokenize the corpus into `data_dir`, or reuse what is there if inputs and settings match.
    One process at a time prepares a data folder."""
    data_dir = Path(data_dir)
    check_writable(data_dir)
    with folder_lock(data_dir, "data preparation", "prepare"):
        return _prepare(corpus_dir, data_dir, split_method, ratios, seed, allow_undecodable, source, force, log)


def _prepare(corpus_dir, data_dir: Path, split_method, ratios, seed, allow_undecodable, source, force, log) -> dict:
    t0 = time.perf_counter()
    reset_peak_rss()
    scan = scan_corpus(corpus_dir, allow_undecodable=allow_undecodable)
    fingerprint = _fingerprint(scan, split_method, ratios, seed)
    meta_path = data_dir / "meta.json"
    if meta_path.exists() and not force:
        try:
            meta = read_json(meta_path, "")
        except DamagedFileError:
            meta = {}
            log(f"{data_dir.name}/meta.json is damaged: preparing the data again")
        if meta.get("fingerprint") == fingerprint and all((data_dir / f"{s}.bin").exists() for s in SPLITS):
            log(f"reusing prepared data in {data_dir.name}/ (same corpus and settings)")
            return meta
        log("corpus or settings changed since the last preparation: rebuilding the token files")
    meta_path.unlink(missing_ok=True)   # from here on, the old files are no longer valid

    if split_method == "proportional":
        plan = _plan_proportional(scan, ratios)
    elif split_method == "documents":
        plan = _plan_documents(scan, ratios, seed)
    else:
        raise ConfigError(f"split_method must be 'proportional' or 'documents', not {split_method!r}")
    needed = int(TOKEN_BYTES_PER_TEXT_BYTE * sum(d.bytes for d in scan.kept))
    if free_bytes(data_dir) < needed:
        raise StorageError(28, f"{data_dir} has {free_bytes(data_dir) / 1e6:,.0f} MB free and the token files "
                               f"need about {needed / 1e6:,.0f} MB. Fix: free some space there or choose "
                               "another run_dir")
    counts = _write_token_files(plan, Path(scan.root), data_dir, needed)

    summary = scan.summary()
    meta = {
        "source": source, "corpus_dir": scan.root, "fingerprint": fingerprint,
        "split_method": split_method, "split_ratios": list(ratios),
        "seed": seed if split_method == "documents" else None,
        "tokenizer": "GPT-2 BPE (tiktoken r50k_base, ids identical to 'gpt2')", "eot_id": EOT_ID,
        "dtype": "uint16", "splits": counts,
        "corpus": {k: v for k, v in summary.items() if not k.startswith(("dropped", "undecodable", "not_prose"))},
        "dropped": {"empty": summary["dropped_empty"], "duplicate": summary["dropped_duplicate"],
                    "undecodable": summary["undecodable"], "not_prose": summary["not_prose"]},
        "files": [{"path": d.path, "bytes": d.bytes, "chars": d.chars, "words": d.words,
                   "status": d.status, **({"note": d.note} if d.note else {})} for d in scan.docs],
        "prep_time_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write_json(meta_path, meta)    # last: its presence with this fingerprint means "prepared"
    dropped = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in meta["dropped"].items() if v) or "none"
    log(f"prepared {summary['kept']} documents ({summary['bytes'] / 1e6:.1f} MB) into {data_dir.name}/: "
        + ", ".join(f"{s} {counts[s]['tokens']:,} tokens" for s in SPLITS)
        + f"; dropped: {dropped}; {meta['prep_time_s']:.1f} s")
    for path, why in summary["not_prose"].items():
        log(f"dropped {path}: {why}")
    return meta


def _write_token_files(plan, root: Path, data_dir: Path, needed: int) -> dict:
    """Tokenize the plan into <split>.bin through temporary files of this process's own, renamed
    only when all three are complete; on any error none is left behind."""
    counts = {s: {"tokens": 0, "chars": 0, "bytes": 0, "words": 0, "documents": 0, "collections": {}}
              for s in SPLITS}
    authors = read_authors(root)
    seen_authors: dict = {}
    parts = {s: temp_path(data_dir / f"{s}.bin") for s in SPLITS}
    outs = {}
    try:
        outs = {s: open(parts[s], "wb") for s in SPLITS}
        for doc, pieces in plan:
            text = read_document(root / doc.path)
            for i, (split, start, end) in enumerate(pieces):
                piece = text[start:end]
                ids = encode(piece)
                if i == len(pieces) - 1:
                    ids.append(EOT_ID)   # the separator follows the document's last piece
                outs[split].write(np.asarray(ids, dtype=np.uint16).tobytes())   # tofile's errors carry no errno
                c = counts[split]
                c["tokens"] += len(ids)
                c["chars"] += len(piece)
                c["bytes"] += len(piece.encode("utf-8"))    # for bits per byte, a tokenizer-free measure
                c["words"] += len(piece.split())
                c["documents"] += 1
                _add_to_collection(c["collections"], seen_authors, split, doc.path, authors.get(doc.path),
                                   len(ids), len(piece.split()))
        for f in outs.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for s in SPLITS:
            os.replace(parts[s], data_dir / f"{s}.bin")
    except BaseException as e:
        for f in outs.values():
            try:
                f.close()
            except OSError:          # the buffered rest cannot be written either: the file goes anyway
                pass
        for part in parts.values():
            part.unlink(missing_ok=True)
        cause = os_error_in(e)
        if cause is not None and not isinstance(e, StorageError):
            raise storage_error(cause, data_dir / "train.bin", needed) from None
        raise
    return counts


def _add_to_collection(collections: dict, seen_authors: dict, split: str, path: str, author: str | None,
                       tokens: int, words: int) -> None:
    """What a split holds, per collection: documents (or parts of one), words, tokens, and distinct
    authors where the corpus names them."""
    name = collection_of(path)
    c = collections.setdefault(name, {"documents": 0, "words": 0, "tokens": 0, "authors": None})
    c["documents"] += 1
    c["words"] += words
    c["tokens"] += tokens
    if author:
        names = seen_authors.setdefault((split, name), set())
        names.add(author)
        c["authors"] = len(names)


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise MissingRunFile(f"no prepared data in {data_dir} (meta.json missing). Fix: run "
                                "notebook 01_data_prep (or prepare_data) with the same run directory first.")
    return read_json(path, "run notebook 01_data_prep again with this run directory: it prepares the data anew")
