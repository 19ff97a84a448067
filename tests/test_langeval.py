"""The offline language evaluation: items built deterministically from the test split only, altered
sentences that differ in the agreeing word alone, scoring checked against models whose answers are
known, and an untrained model at chance."""
import math
import re
import shutil

import numpy as np
import pytest
import torch

from llm_nb_utils import langeval as le
from llm_nb_utils.arms import build_model
from llm_nb_utils.config import make_config
from llm_nb_utils.layers import LMOutput
from llm_nb_utils.tokenizer import EOT_ID, encode


@pytest.fixture(scope="module")
def items(prepared_run):
    return le.build_items(prepared_run / "data", seed=2024, context_length=64)


def test_items_are_deterministic_and_come_from_the_test_split_only(items, prepared_run):
    again = le.build_items(prepared_run / "data", seed=2024, context_length=64)
    assert again["fingerprint"] == items["fingerprint"] and again["gender"] == items["gender"]
    assert le.build_items(prepared_run / "data", seed=7, context_length=64)["fingerprint"] != items["fingerprint"]
    test_text = " ".join(" ".join(d.split()) for d in le.split_text(prepared_run / "data", "test"))
    train_text = " ".join(" ".join(d.split()) for d in le.split_text(prepared_run / "data", "train"))
    for task in ("gender", "number"):
        assert items[task], task
        for it in items[task]:
            assert it["good"] in test_text and it["good"] not in train_text
    for it in items["last_word"]:
        assert " ".join((it["context"] + " " + it["word"]).split()[-8:]) in test_text


def test_an_altered_sentence_differs_in_the_agreeing_word_only(items):
    for task in ("gender", "number"):
        for it in items[task]:
            good, bad = it["good"].split(" "), it["bad"].split(" ")
            diff = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
            assert len(good) == len(bad) and len(diff) == 1, it
            old, new = (re.sub(r"\W", "", w).lower() for w in (good[diff[0]], bad[diff[0]]))
            (g1, n1, row1), (g2, n2, row2) = le.DETERMINER[old], le.DETERMINER[new]
            assert row1 == row2 and ((g1 != g2) == (task == "gender")) and ((n1 != n2) == (task == "number"))


def test_each_determiner_pair_is_balanced(items):
    for task in ("gender", "number"):
        sides = {}
        for it in items[task]:
            g, n, row = le.DETERMINER[it["determiner"].lower()]
            sides.setdefault(row[0], []).append(g if task == "gender" else n)
        for row, s in sides.items():
            assert len(set(s)) == 2 and s.count(s[0]) * 2 == len(s), (task, row, s)


def test_the_swap_keeps_capitals():
    assert le._swap("Os", "gender") == "As" and le._swap("um", "number") == "uns" and le._swap("Da", "number") == "Das"


def test_wilson_interval():
    low, high = le.wilson(0, 400)
    assert low == 0 and 0.005 < high < 0.015
    low, high = le.wilson(200, 400)
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.01)


class Oracle(torch.nn.Module):
    """A model whose answers are known: it puts all its probability on the tokens of `text`."""

    def __init__(self, text: str, vocab: int = 50257):
        super().__init__()
        self.ids, self.vocab = encode(text), vocab

    def _logits(self, idx):
        logits = torch.full((*idx.shape, self.vocab), -30.0)
        for b in range(idx.shape[0]):
            for j in range(idx.shape[1]):
                seq = idx[b, :j + 1].tolist()
                nxt = self._next(seq)
                logits[b, j, nxt] = 30.0
        return logits

    def _next(self, seq):
        for k in range(len(self.ids)):            # after the longest suffix of seq that is a prefix of ids
            if seq[len(seq) - k:] == self.ids[:k] if k else True:
                best = k
        return self.ids[best] if best < len(self.ids) else EOT_ID

    def logits_at(self, idx, positions):
        logits = self._logits(idx)
        return logits[torch.arange(idx.shape[0])[:, None], positions]

    def forward(self, idx, targets=None, per_token=False):
        logp = self._logits(idx).log_softmax(-1)
        return LMOutput(None, -logp.gather(-1, targets[..., None])[..., 0])


def test_last_word_scoring_on_a_model_that_knows_the_answer():
    item = {"context": "Era uma vez uma", "word": "princesa"}
    knows = le.score_last_word(Oracle("Era uma vez uma princesa."), [item], 64, torch.device("cpu"))
    assert knows["correct"] == [1.0] and knows["log_likelihood"][0] > -1e-6
    longer = le.score_last_word(Oracle("Era uma vez uma princesas"), [item], 64, torch.device("cpu"))
    assert longer["correct"] == [0.0]          # the word goes on: not the whole word
    wrong = le.score_last_word(Oracle("Era uma vez uma rainha."), [item], 64, torch.device("cpu"))
    assert wrong["correct"] == [0.0] and wrong["log_likelihood"][0] < -10


def test_pair_scoring_on_models_that_know_one_sentence():
    pair = {"good": "Ele viu a casa.", "bad": "Ele viu o casa."}
    assert le.score_pairs(Oracle(pair["good"]), [pair], torch.device("cpu")) == [1.0]
    assert le.score_pairs(Oracle(pair["bad"]), [pair], torch.device("cpu")) == [0.0]


def test_generation_statistics():
    s = le.generation_stats(["o gato viu o gato viu o gato", "casa azul"], {"o", "gato", "viu", "casa"})
    assert s["in_vocabulary"] == pytest.approx(9 / 10)
    assert s["distinct_2"] == pytest.approx(4 / 8)            # o gato, gato viu, viu o (x2), casa azul
    assert s["repetition"] == pytest.approx(3 / 6)


@pytest.fixture(scope="module")
def novels(tmp_path_factory):
    """Machado de Assis's novels (3 MB): enough text for every task's full set of items."""
    from conftest import CORPUS
    from llm_nb_utils.prepare import prepare_data
    run = tmp_path_factory.mktemp("novels")
    shutil.copytree(CORPUS / "machado-de-assis" / "romance", run / "corpus")
    prepare_data(run / "corpus", run / "data", log=lambda *_: None)
    return run / "data"


def test_an_untrained_model_scores_at_chance(novels):
    cfg = make_config("smoke", device="cpu", context_length=64)
    results = le.evaluate(build_model("moe_gqa", cfg), novels, cfg, torch.device("cpu"))
    assert set(results["tasks"]) == {"last_word", "gender", "number"} and not results["warnings"]
    for task, r in results["tasks"].items():
        assert r["n"] == len(r["correct"]) == le.ITEMS[task]
        assert r["ci"][0] <= r["chance"] <= r["ci"][1], (task, r["accuracy"], r["ci"])
    assert (novels / "evalpack.json").exists()
    assert abs(results["combined"]) < 0.1


def test_too_few_items_leave_the_task_out_with_a_warning(prepared_run, tmp_path, monkeypatch):
    monkeypatch.setattr(le, "MIN_ITEMS", 10_000)
    cfg = make_config("smoke", device="cpu")
    (tmp_path / "data").symlink_to(prepared_run / "data")
    results = le.evaluate(build_model("gpt2", cfg), tmp_path / "data", cfg, torch.device("cpu"), log=lambda *_: None)
    assert results["tasks"] == {} and len(results["warnings"]) == 3 and math.isnan(results["combined"])
    assert "left out" in results["warnings"][0]
