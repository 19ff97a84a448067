"""The measurements the notebooks teach with, against hand computations on tiny inputs."""
import math

import pytest

from llm_nb_utils import anatomy
from llm_nb_utils.accounting import bits_per_byte, count_params
from llm_nb_utils.config import make_config
from llm_nb_utils.arms import build_model


def test_bits_per_byte_by_hand():
    # 2 nats per token over 100 tokens of 250 bytes: 200 nats = 288.539 bits, over 250 bytes
    assert bits_per_byte(2.0, 100, 250) == pytest.approx(200 / math.log(2) / 250)
    assert bits_per_byte(math.log(2), 8, 8) == pytest.approx(1.0)        # one bit per token, one token per byte


def test_kv_cache_bytes_by_hand():
    c = make_config("paper")
    # GPT-2: keys and values, 8 layers x 8 heads x 64 dims x 2 bytes = 16,384 bytes per token
    assert anatomy.kv_cache_bytes(c, "gpt2") == 2 * 8 * 8 * 64 * 2 == 16_384
    # GQA keeps 4 shared K/V heads: half, and at the full context of 256 tokens 2 MiB vs 4 MiB
    assert anatomy.kv_cache_bytes(c, "moe_gqa") == 8_192
    assert anatomy.kv_cache_bytes(c, "gpt2", tokens=256) == 4 * 2**20
    assert anatomy.kv_cache_bytes(c, "moe_gqa", tokens=256, bytes_per_value=4) == 4 * 2**20


def test_parameters_by_component_add_up_and_match_a_hand_count():
    c = make_config("smoke", device="cpu")      # V 50257, d 64, T 32, 2 layers, 4 heads of 16, MLP 256
    for name in ("gpt2", "moe_gqa"):
        model = build_model(name, c)
        parts = anatomy.params_by_component(model)
        assert parts.sum() == count_params(model)["total_params"], name
        assert parts["LM head"] == 0                                     # tied: counted with the embeddings
    gpt2 = anatomy.params_by_component(build_model("gpt2", c))
    assert gpt2["embeddings"] == 50257 * 64 + 32 * 64
    assert gpt2["attention"] == 2 * (64 * 3 * 64 + 64 * 64)
    assert gpt2["feed-forward"] == 2 * (2 * 64 * 256)
    assert gpt2["norms"] == 2 * 2 * (2 * 64) + 2 * 64 and gpt2["router"] == 0
    moe = anatomy.params_by_component(build_model("moe_gqa", c))
    assert moe["attention"] == 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64)   # q, k and v of 2 groups, out
    assert moe["feed-forward"] == 2 * 4 * 3 * 64 * 128 and moe["router"] == 2 * 64 * 4
    assert moe["norms"] == 2 * (2 * 64 + 2 * 16) + 64                    # RMSNorm pre-blocks, q/k norms, final


def test_rope_scores_depend_only_on_the_distance():
    scores = anatomy.rope_scores(pairs=((0, 3), (5, 8), (20, 23), (0, 10)))
    same = scores[scores["distance n - m"] == 3]["q . k"]
    assert same.max() - same.min() < 1e-3
    assert abs(scores["q . k"].iloc[3] - scores["q . k"].iloc[0]) > 1e-3


def test_route_gives_each_token_its_chosen_experts_weights():
    c = make_config("smoke", device="cpu")
    model = build_model("moe_gqa", c)
    table = anatomy.route(model, [31, 3815, 64, 1492], layer=1)
    assert list(table.columns) == [f"expert {e}" for e in range(c.num_experts)] and len(table) == 4
    assert table.index[0] == "0: @" and table.index[3] == "3: ␣book"        # ␣: the token's leading space
    assert ((table > 0).sum(axis=1) == c.num_experts_per_token).all()       # k experts a token, the rest 0
    assert (table.sum(axis=1) - 1).abs().max() < 2e-3                       # renormalised weights
    assert model.training                                                # left in the mode it was in


def test_the_measured_kv_cache_holds_what_the_formula_says():
    """A real KVCache after greedy decoding: GPT-2 holds every head's keys and values, the GQA arms
    n_kv_groups heads, byte for byte."""
    c = make_config("smoke", device="cpu")
    models = {n: build_model(n, c) for n in ("gpt2", "dense_gqa", "moe_gqa")}
    table = anatomy.kv_cache_measured(models, [31, 3815, 64], new_tokens=10)
    assert (table["tokens cached"] == 12).all() and table["equal"].all()
    held = table["bytes held (measured)"].str.replace(",", "").astype(int)
    assert held.iloc[0] == 2 * held.iloc[1] == 2 * 2 * c.n_layers * c.n_kv_groups * c.head_dim * 4 * 12
    speed = anatomy.generation_speed(models, [31, 3815, 64], new_tokens=5, rounds=1)
    assert speed["same tokens"].all() and (speed["tokens/s with the cache"] > 0).all()
