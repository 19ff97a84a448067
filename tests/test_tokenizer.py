import pytest

from llm_nb_utils import tokenizer


def test_gpt2_ids_offline():
    enc = tokenizer.get_tokenizer()
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    # Reference ids of tiktoken's "gpt2" encoding for this text.
    assert tokenizer.encode("Hello world") == [15496, 995]
    text = "Lisboa, a cidade à beira do Tejo."
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_missing_ranks_gives_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))       # an empty cache
    import tiktoken.load

    def offline(*a, **k):
        raise ConnectionError("network unreachable")
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    tokenizer.get_tokenizer.cache_clear()
    import tiktoken.registry
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    try:
        with pytest.raises(tokenizer.TokenizerUnavailable) as e:
            tokenizer.get_tokenizer()
        msg = str(e.value)
        assert "r50k_base.tiktoken" in msg and tokenizer.R50K_CACHE_NAME in msg and "TIKTOKEN_CACHE_DIR" in msg
    finally:
        tokenizer.get_tokenizer.cache_clear()


def test_pieces_show_the_leading_space_and_portuguese_takes_more_tokens_per_word():
    from llm_nb_utils import report
    from llm_nb_utils.tokenizer import pieces
    cut = pieces("Disse-lhe que não", show_spaces=True)
    assert "".join(cut).replace("␣", " ") == "Disse-lhe que não" and "␣que" in cut and "que" not in cut
    t = report.token_cut({"pt": "Disse-lhe que não o faria, mas acabou por fazê-lo às pressas.",
                          "en": "He told her that he would not do it, but he ended up doing it in a hurry."})
    assert t.loc["pt", "tokens per word"] > 2 * t.loc["en", "tokens per word"]
