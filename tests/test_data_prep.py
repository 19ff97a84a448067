import json

import numpy as np
import pytest
import torch

from llm_nb_utils.config import make_config
from llm_nb_utils.corpus import CorpusError, clean_text, scan_corpus
from llm_nb_utils.data import DataSizeError, TokenWindowDataset, load_splits, table1
from llm_nb_utils.prepare import prepare_data
from llm_nb_utils.tokenizer import EOT_ID, decode

quiet = dict(log=lambda *_: None)


def write(d, name, data):
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def test_clean_text_normalises():
    raw = "\ufeffLinha um  \r\n\r\n\r\n\r\nLinha\tdois\rA\u0301gua\n\n\n"
    assert clean_text(raw) == "Linha um\n\nLinha\tdois\n\u00c1gua"


def test_scan_reports_empty_duplicate_and_undecodable(tmp_path):
    write(tmp_path, "a.txt", "Era uma vez.")
    write(tmp_path, "sub/b.txt", "Era uma vez.\r\n")           # duplicate after cleaning
    write(tmp_path, "c.txt", "  \n\n ")
    write(tmp_path, "d.txt", "ol\xe1".encode("latin-1"))
    write(tmp_path, "ignored.md", "not a txt")
    with pytest.raises(CorpusError) as e:
        scan_corpus(tmp_path)
    assert "d.txt" in str(e.value) and "allow_undecodable=True" in str(e.value)
    scan = scan_corpus(tmp_path, allow_undecodable=True)
    s = scan.summary()
    assert (s["files"], s["kept"]) == (4, 1)
    assert s["dropped_empty"] == ["c.txt"] and s["dropped_duplicate"] == ["sub/b.txt"] and s["undecodable"] == ["d.txt"]


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: write(d, "f.txt", "x"), "is a file"),
    (lambda d: d, "no .txt files"),
    (lambda d: (write(d, "e.txt", "\n\n"), d)[1], "no usable text"),
])
def test_bad_corpus_paths(tmp_path, setup, fragment):
    with pytest.raises(CorpusError, match=fragment):
        scan_corpus(setup(tmp_path))


def test_proportional_split_tokens_roundtrip(tmp_path):
    docs = {f"d{i}.txt": f"Documento {i}. " + "palavra " * (40 + 10 * i) for i in range(5)}
    for n, t in docs.items():
        write(tmp_path / "c", n, t)
    meta = prepare_data(tmp_path / "c", tmp_path / "data", **quiet)
    parts = {s: np.fromfile(tmp_path / "data" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val", "test")}
    assert {s: len(a) for s, a in parts.items()} == {s: meta["splits"][s]["tokens"] for s in parts}
    chars = [meta["splits"][s]["chars"] for s in ("train", "val", "test")]
    total = sum(chars)
    assert total == sum(len(clean_text(t)) for t in docs.values())
    assert abs(chars[0] / total - 0.8) < 0.01 and abs(chars[1] / total - 0.1) < 0.01
    # One EOT per document, and the text comes back once the pieces are joined.
    all_ids = np.concatenate(list(parts.values()))
    assert int((all_ids == EOT_ID).sum()) == 5
    text = "".join(decode(p[p != EOT_ID].tolist()) for p in parts.values())
    assert text == "".join(clean_text(docs[n]) for n in sorted(docs))


def test_document_split_keeps_documents_whole(tmp_path):
    for i in range(20):
        write(tmp_path / "c", f"doc{i:02d}.txt", f"Texto número {i}. " * 30)
    meta = prepare_data(tmp_path / "c", tmp_path / "data", split_method="documents", seed=7, **quiet)
    assert meta["split_method"] == "documents"
    assert sum(meta["splits"][s]["documents"] for s in ("train", "val", "test")) == 20
    for s in ("train", "val", "test"):
        ids = np.fromfile(tmp_path / "data" / f"{s}.bin", dtype=np.uint16)
        assert ids[-1] == EOT_ID and int((ids == EOT_ID).sum()) == meta["splits"][s]["documents"]


def test_rerun_reuses_and_changes_rebuild(tmp_path):
    write(tmp_path / "c", "a.txt", "Primeiro texto. " * 50)
    write(tmp_path / "c", "b.txt", "Segundo texto. " * 50)
    msgs = []
    m1 = prepare_data(tmp_path / "c", tmp_path / "data", log=msgs.append)
    mtime = (tmp_path / "data" / "train.bin").stat().st_mtime_ns
    m2 = prepare_data(tmp_path / "c", tmp_path / "data", log=msgs.append)
    assert m2["fingerprint"] == m1["fingerprint"] and "reusing" in msgs[-1]
    assert (tmp_path / "data" / "train.bin").stat().st_mtime_ns == mtime
    write(tmp_path / "c", "b.txt", "Segundo texto mudado. " * 50)
    m3 = prepare_data(tmp_path / "c", tmp_path / "data", log=msgs.append)
    assert m3["fingerprint"] != m1["fingerprint"] and "rebuilding" in msgs[-2]
    m4 = prepare_data(tmp_path / "c", tmp_path / "data", split_method="documents", log=msgs.append)
    assert m4["fingerprint"] != m3["fingerprint"]
    # An interrupted preparation (no meta.json) is never taken for a finished one.
    (tmp_path / "data" / "meta.json").unlink()
    prepare_data(tmp_path / "c", tmp_path / "data", log=msgs.append)
    assert "reusing" not in msgs[-1]


def test_windows_are_shifted_views_of_the_file(tmp_path):
    ids = np.arange(1000, 1000 + 23, dtype=np.uint16)
    ids.tofile(tmp_path / "t.bin")
    ds = TokenWindowDataset(tmp_path / "t.bin", context_length=8, stride=4)
    assert len(ds) == (23 - 9) // 4 + 1 == 4
    x, y = ds[2]
    assert x.dtype == torch.int64 and x.tolist() == list(range(1008, 1016)) and y.tolist() == list(range(1009, 1017))
    assert isinstance(ds.tokens, np.memmap)
    with pytest.raises(IndexError):
        ds[4]


def test_loaders_shuffle_train_only_and_table1_matches(prepared_run, smoke_cfg):
    loaders = load_splits(prepared_run / "data", smoke_cfg)
    sampler = loaders["train"].batch_sampler
    first = list(sampler)
    assert sorted(i for b in first for i in b) != [i for b in first for i in b]   # shuffled
    assert list(sampler) == first                                                  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(loaders["val"].batch_sampler)[0] == list(range(smoke_cfg.batch_size))
    t1 = table1(prepared_run / "data", smoke_cfg, loaders)
    assert list(t1.columns) == ["train", "validation", "test"]
    assert list(t1.index) == ["words", "samples", "tokens_per_sample", "batch_size", "batches", "words: (top level)"]
    assert t1.loc["samples", "train"] == len(loaders["train"].dataset)
    assert t1.loc["batches", "train"] == t1.loc["samples", "train"] // smoke_cfg.batch_size
    assert t1.loc["batches", "test"] == -(-t1.loc["samples", "test"] // smoke_cfg.batch_size)
    meta = json.loads((prepared_run / "data" / "meta.json").read_text())
    assert t1.loc["words", "train"] == meta["splits"]["train"]["words"] > 0


def test_too_little_text_names_the_numbers(tmp_path):
    write(tmp_path / "c", "a.txt", "Pouco texto aqui. " * 12)
    prepare_data(tmp_path / "c", tmp_path / "data", **quiet)
    with pytest.raises(DataSizeError, match=r"the train split has 76 tokens, fewer than the 257 needed.*context_length=256"):
        load_splits(tmp_path / "data", make_config("paper"))
    with pytest.raises(DataSizeError, match="fewer than one batch of batch_size=64"):
        load_splits(tmp_path / "data", make_config("smoke", context_length=4, stride=4, batch_size=64))


def test_missing_prepared_data_says_which_notebook(tmp_path, smoke_cfg):
    with pytest.raises(FileNotFoundError, match="01_data_prep"):
        load_splits(tmp_path, smoke_cfg)
