import math

import pytest
import torch
import torch.nn.functional as F

from llm_nb_utils import layers
from llm_nb_utils.accounting import count_params, flops_per_token
from llm_nb_utils.config import make_config
from llm_nb_utils.generate import generate
from llm_nb_utils.gpt2 import MultiHeadAttention
from llm_nb_utils.layers import apply_rope, rope_tables
from llm_nb_utils.qwen3 import GroupedQueryAttention, SwiGLUFeedForward
from llm_nb_utils.arms import ARM_NAMES, build_model
from llm_nb_utils import moe as moe_mod
from llm_nb_utils.moe import GroupedExperts, MoEFeedForward, balancing_loss

NAMES = list(ARM_NAMES)


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_a_one_expert_top1_moe_is_the_dense_swiglu_exactly(path, monkeypatch):
    """Dense-GQA and MoE-GQA share one SwiGLU: with one expert and top-1 routing the gate weight is
    exactly 1, and the MoE layer must equal the dense layer carrying the same weights, bit for bit
    (the loop path runs the very same products; the grouped kernel may round differently)."""
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 32, num_experts=1, top_k=1)
    for w in (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down, moe.router.weight):
        torch.nn.init.normal_(w, std=0.3)
    dense = SwiGLUFeedForward(16, 32)
    with torch.no_grad():
        for role in ("w_gate", "w_up", "w_down"):
            getattr(dense, role).copy_(getattr(moe.experts, role)[0])
    monkeypatch.setattr(GroupedExperts, "uses_grouped_mm", lambda *_: path == "grouped")
    x = torch.randn(3, 7, 16)
    if path == "loop":
        assert torch.equal(moe(x)[0], dense(x))
    else:
        torch.testing.assert_close(moe(x)[0], dense(x), rtol=1e-6, atol=1e-6)


def test_dense_gqa_is_moe_gqa_with_a_dense_feed_forward():
    """The same attention, norms, embeddings and head (same names, same shapes); the feed-forward as
    wide as the experts a token uses, so active parameters differ by the router alone."""
    cfg = tiny()
    dense, moe = (build_model(n, cfg).state_dict() for n in ("dense_gqa", "moe_gqa"))
    shared = {k for k in moe if ".moe." not in k}
    assert shared == {k for k in dense if ".ff." not in k}
    assert all(dense[k].shape == moe[k].shape for k in shared)
    assert dense["blocks.0.ff.w_gate"].shape == (cfg.emb_dim, cfg.num_experts_per_token * cfg.moe_intermediate_size)
    a, b = (count_params(build_model(n, cfg)) for n in ("dense_gqa", "moe_gqa"))
    assert b["active_params"] - a["active_params"] == cfg.n_layers * cfg.emb_dim * cfg.num_experts
    iso_total = count_params(build_model("dense_gqa", tiny(dense_ff_width=cfg.num_experts * cfg.moe_intermediate_size)))
    assert iso_total["total_params"] == b["total_params"] - cfg.n_layers * cfg.emb_dim * cfg.num_experts


def tiny(**kw):
    return make_config("smoke", device="cpu", **kw)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_initial_loss(name):
    cfg = tiny(vocab_size=50257)
    model = build_model(name, cfg)
    x = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
    y = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
    assert model(x).logits.shape == (3, cfg.context_length, cfg.vocab_size)
    out = model(x, y)
    assert out.logits is None            # loss fused with the head, no full logits
    assert abs(out.loss.item() - math.log(cfg.vocab_size)) < 0.1
    assert [r.counts.shape for r in out.routing] == ([(cfg.num_experts,)] * cfg.n_layers if name == "moe_gqa" else [])
    with torch.no_grad():                # evaluation: the fused loss without its gradients
        plain = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        assert model(x, y).loss.item() == pytest.approx(plain.item(), abs=1e-5)
        assert model(x, y).loss.item() == pytest.approx(out.loss.item(), abs=1e-5)


# 30: slices of 30, 30, 30, 10; 100: the whole; None: the CPU default, an aligned 64 and a 36 tail
@pytest.mark.parametrize("vocab_block", [30, 100, None])
def test_fused_head_and_loss_equal_plain_cross_entropy(monkeypatch, vocab_block):
    from llm_nb_utils import loss as loss_mod
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 7 * 100)     # 7 rows a chunk: several chunks
    torch.manual_seed(0)
    h = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    t = torch.randint(0, 100, (30,))
    fused = loss_mod.linear_cross_entropy(h, w, t, vocab_block)
    g_fused = torch.autograd.grad(3 * fused, [h, w])
    plain = F.cross_entropy(h @ w.t(), t)
    g_plain = torch.autograd.grad(3 * plain, [h, w])
    assert fused.item() == pytest.approx(plain.item(), abs=1e-6)
    for a, b in zip(g_fused, g_plain):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():                                          # the evaluation path
        assert loss_mod.linear_cross_entropy(h, w, t, vocab_block).item() == pytest.approx(plain.item(), abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
    cfg = tiny()
    model = build_model(name, cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    x2 = x.clone()
    x2[:, 12:] = torch.randint(0, cfg.vocab_size, (2, 8))
    a, b = model(x).logits, model(x2).logits
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_paper_parameter_counts_match_a_hand_count():
    cfg = make_config("paper", device="cpu")
    V, d, T, L, h, hd, ff, g, E, k, m = 50257, 512, 256, 8, 8, 64, 2048, 4, 4, 2, 1024
    # GPT-2, tied head: token + position embeddings; per layer two LayerNorms (weight+bias),
    # fused qkv, output projection, MLP; final LayerNorm. No linear biases (bias=False).
    gpt2_layer = 2 * 2 * d + d * 3 * h * hd + h * hd * d + 2 * d * ff
    gpt2 = V * d + T * d + L * gpt2_layer + 2 * d
    assert gpt2 == 51_045_888
    # MoE-GQA: token embedding; per layer two RMSNorms, q/k/v/o, QK-norm, router, E SwiGLU experts.
    expert = 3 * d * m
    moe_layer = 2 * d + d * h * hd + 2 * d * g * hd + h * hd * d + 2 * hd + d * E + E * expert
    moe = V * d + L * moe_layer + d
    assert count_params(build_model("gpt2", cfg)) == {"total_params": gpt2, "active_params": gpt2}
    assert count_params(build_model("moe_gqa", cfg)) == {"total_params": moe,
                                                         "active_params": moe - L * (E - k) * expert}


def test_untied_head_adds_its_own_matrix():
    a = count_params(build_model("gpt2", tiny()))["total_params"]
    b = count_params(build_model("gpt2", tiny(tie_embeddings=False)))["total_params"]
    assert b - a == 50257 * 64


def test_flops_per_token_formula():
    cfg = tiny()
    d, L, h, hd, T, ff, V = 64, 2, 4, 16, 32, 256, 50257
    n_matmul = L * (d * 3 * h * hd + h * hd * d + 2 * d * ff) + d * V
    assert flops_per_token(build_model("gpt2", cfg)) == 6 * n_matmul + 12 * L * h * hd * T


def test_gqa_with_one_query_per_kv_head_equals_mha():
    torch.manual_seed(0)
    d, h, hd = 32, 4, 8
    mha = MultiHeadAttention(d, h, hd, bias=True)
    gqa = GroupedQueryAttention(d, h, h, hd, bias=True, qk_norm=False)
    wq, wk, wv = mha.qkv.weight.split(h * hd)
    bq, bk, bv = mha.qkv.bias.split(h * hd)
    with torch.no_grad():
        for lin, w, b in ((gqa.q_proj, wq, bq), (gqa.k_proj, wk, bk), (gqa.v_proj, wv, bv)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        gqa.out_proj.load_state_dict(mha.out_proj.state_dict())
    x = torch.randn(2, 10, d)
    identity = torch.ones(10, hd), torch.zeros(10, hd)   # cos=1, sin=0: no rotation
    assert torch.allclose(gqa(x, *identity), mha(x), atol=1e-6)


def test_gqa_matches_explicitly_repeated_kv(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 6, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert torch.allclose(layers.causal_attention(q, k, v), ref, atol=1e-6)
    monkeypatch.setattr(layers, "SDPA_GQA", False)          # the fallback for older torch builds
    assert torch.allclose(layers.causal_attention(q, k, v), ref, atol=1e-6)


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = rope_tables(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (apply_rope(q, cos, sin, m) * apply_rope(k, cos, sin, n)).sum().item()
    assert score(3, 1) == pytest.approx(score(40, 38), abs=1e-4)
    assert score(5, 5) == pytest.approx(score(60, 60), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)


def reference_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Plain per-expert reference: every expert on every token, masked by its routing weight."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.softmax(flat.float() @ moe.router.weight.float().T, dim=-1)
    w, idx = probs.topk(moe.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e in range(moe.num_experts):
        h = F.silu(flat @ moe.experts.w_gate[e]) * (flat @ moe.experts.w_up[e])
        weight = (w * (idx == e)).sum(-1, keepdim=True)
        out = out + weight * (h @ moe.experts.w_down[e])
    return out.view_as(x)


@pytest.mark.parametrize("dims,path", [((16, 32), "grouped"), ((16, 32), "loop"), ((18, 30), "auto")])
def test_moe_fast_paths_equal_reference_outputs_and_gradients(dims, path, monkeypatch):
    """Both dispatch paths (one grouped product; a loop over experts) against the plain reference.
    (18, 30) breaks the grouped kernels' 16-byte stride rule, so it must fall back to the loop."""
    torch.manual_seed(0)
    moe = MoEFeedForward(*dims, num_experts=4, top_k=2)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(3, 7, dims[0], requires_grad=True)
    if path == "auto":
        assert not moe.experts.uses_grouped_mm(x.device, x.dtype)
    else:
        monkeypatch.setattr(GroupedExperts, "uses_grouped_mm", lambda *_: path == "grouped")
    fast, _ = moe(x)
    weights = [x, moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down, moe.router.weight]
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), weights)
    ref = reference_moe(moe, x)
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), weights)
    assert torch.allclose(fast, ref, atol=1e-5)
    for a, b in zip(grads_fast, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_grouped_product_is_used_where_it_works_and_refused_where_it_fails(monkeypatch):
    moe = MoEFeedForward(16, 32, num_experts=4, top_k=2)
    cpu = torch.device("cpu")
    assert moe.experts.uses_grouped_mm(cpu, torch.float32) == (moe_mod._GROUPED_MM is not None)    # this torch's CPU build has one

    def broken(*a, **k):
        raise RuntimeError("no kernel for this device")

    def wrong(x, w, offs):          # runs and differentiates, but gives every row to group 0
        return x @ w[0]

    monkeypatch.setattr(moe_mod, "_GROUPED_MM_WORKS", {})      # not probed yet in this test
    with torch.no_grad():                                      # first use in evaluation
        assert moe.experts.uses_grouped_mm(cpu, torch.float32) == (moe_mod._GROUPED_MM is not None)
    for fake in (broken, wrong):
        monkeypatch.setattr(moe_mod, "_GROUPED_MM", fake)
        monkeypatch.setattr(moe_mod, "_GROUPED_MM_WORKS", {})
        assert not moe.experts.uses_grouped_mm(cpu, torch.float32)
        x = torch.randn(2, 5, 16)
        assert torch.allclose(moe(x)[0], reference_moe(moe, x), atol=1e-5)     # the loop serves instead


@pytest.mark.skipif(moe_mod._GROUPED_MM is None, reason="this torch has no grouped matrix product")
def test_training_forward_traces_as_one_graph(monkeypatch):
    """No host sync in the training forward (model, MoE dispatch, fused loss): torch.compile (dynamo)
    sees each model as one graph, under bf16 autocast as on a GPU, the MoE's support probe included
    (it has not run yet in this process for bf16). The loop over experts reads the segment sizes on
    the host, which dynamo must break on."""
    import torch._dynamo as dynamo
    idx, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    models = {name: build_model(name, tiny()) for name in NAMES}
    monkeypatch.setattr(moe_mod, "_GROUPED_MM_WORKS", {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, model in models.items():
            dynamo.reset()
            assert dynamo.explain(model)(idx, targets).graph_break_count == 0, name
        assert moe_mod._GROUPED_MM_WORKS == {("cpu", torch.bfloat16): True}
        dynamo.reset()
        for block in models["moe_gqa"].blocks:
            block.moe.experts.uses_grouped_mm = lambda *_: False
        assert dynamo.explain(models["moe_gqa"])(idx, targets).graph_break_count > 0
    dynamo.reset()


def test_routing_picks_k_experts_with_weights_summing_to_one():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 32, num_experts=5, top_k=3)
    probs, experts, weights = moe.router(torch.randn(50, 16))
    assert experts.shape == (50, 3) and weights.shape == (50, 3)
    assert all(len(set(r)) == 3 for r in experts.tolist())
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    assert torch.allclose(probs.sum(-1), torch.ones(50))
    _, routing = moe(torch.randn(2, 25, 16))
    assert routing.counts.sum().item() == 50 * 3


def test_router_runs_in_fp32_under_autocast():
    moe = MoEFeedForward(16, 32, num_experts=4, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, _, weights = moe.router(torch.randn(10, 16))
    assert probs.dtype == torch.float32 and weights.dtype == torch.float32


def test_aux_loss_is_one_when_balanced_and_pushes_a_collapsed_router_back():
    """Switch loss E * sum_e f_e * P_e: 1 for a uniform router, near E/k when every token picks the
    same k experts, and descending it alone spreads the tokens again. (With top-k > 1 it is not a strict
    lower bound: some unbalanced routers score slightly below 1, so we test the behaviour that matters.)"""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 16)
    moe = MoEFeedForward(16, 32, num_experts=4, top_k=2)
    torch.nn.init.zeros_(moe.router.weight)

    def aux(x):
        _, routing = moe(x)
        return balancing_loss([routing]), routing.counts.tolist()
    assert aux(x)[0].item() == pytest.approx(1.0)
    with torch.no_grad():                       # a bias-like direction: every token prefers experts 0, 1
        moe.router.weight.zero_()
        x = x + 1.0
        moe.router.weight[0].fill_(0.3)
        moe.router.weight[1].fill_(0.25)
    collapsed, counts = aux(x)    # E * (f=1/2) * (P0 + P1): close to E/k = 2 as P0 + P1 -> 1
    assert collapsed.item() > 1.5
    assert counts[2:] == [0, 0]
    opt = torch.optim.SGD([moe.router.weight], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        aux(x)[0].backward()
        opt.step()
    balanced, counts = aux(x)
    assert balanced.item() == pytest.approx(1.0, abs=0.02)
    assert min(counts) >= 0.8 * 32


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_generation_equals_uncached(name):
    cfg = tiny()
    model = build_model(name, cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    cached = generate(model, prompt, 20, use_cache=True)
    plain = generate(model, prompt, 20, use_cache=False)
    assert cached.shape == (2, 25) and torch.equal(cached, plain)
    s1 = generate(model, prompt, 10, temperature=1.0, top_k=20, seed=3)
    s2 = generate(model, prompt, 10, temperature=1.0, top_k=20, seed=3, use_cache=False)
    assert torch.equal(s1, s2)


def test_gqa_cache_holds_only_kv_heads_and_chunked_prefill_matches():
    cfg = tiny()
    model = build_model("moe_gqa", cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    cache = model.new_cache()
    first = model(x[:, :7], cache=cache).logits
    second = model(x[:, 7:], cache=cache).logits
    assert cache.keys[0].shape == (1, cfg.n_kv_groups, 12, cfg.head_dim)
    full = model(x).logits
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_generation_past_the_context_slides_the_window_like_recomputation(name):
    """Beyond context_length the model sees its last context_length tokens; with the cache rebuilt
    from that window the tokens are those of recomputing each step without a cache."""
    cfg = tiny()
    model = build_model(name, cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    n = 2 * cfg.context_length                        # well past the 32-token context
    cached = generate(model, prompt, n, use_cache=True)
    assert cached.shape == (2, 5 + n)
    reference = prompt
    with torch.no_grad():                             # by hand: crop, full forward, argmax
        for _ in range(n):
            nxt = model.eval()(reference[:, -cfg.context_length:]).logits[:, -1].argmax(-1, keepdim=True)
            reference = torch.cat([reference, nxt], 1)
    assert torch.equal(cached, reference)
    assert torch.equal(generate(model, prompt, n, use_cache=False), reference)
    long_prompt = torch.randint(0, cfg.vocab_size, (1, cfg.context_length + 7))   # a prompt longer than the context
    assert generate(model, long_prompt, 3).shape == (1, cfg.context_length + 10)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 5)


@pytest.mark.parametrize("vocab_block", [1024, None, 5000])   # slices; 4992 + 8 (the default); whole
def test_fused_loss_gradients_survive_fp16_autocast(vocab_block):
    """Under fp16 autocast (P100, T4) the head's gradients stay within 0.1% of fp32. Dividing by the
    2048 rows before the fp16 products (outside the GradScaler) flushed small entries to zero: 0.45%."""
    from llm_nb_utils.loss import linear_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(2048, 32, requires_grad=True)
    w = (torch.randn(5000, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 5000, (2048,))
    ref = torch.autograd.grad(F.cross_entropy(h @ w.t(), t), [h, w])
    with torch.autocast("cpu", dtype=torch.float16):
        got = torch.autograd.grad(linear_cross_entropy(h, w, t, vocab_block), [h, w])
    for a, b in zip(got, ref):
        assert torch.linalg.norm(a.float() - b) / torch.linalg.norm(b) < 1e-3


def test_with_one_expert_per_token_only_the_balancing_loss_trains_the_router():
    """The router renormalises its top-k weights to sum to 1 (Qwen3-MoE's norm_topk_prob). With k = 1
    the one weight is exactly 1 whatever the scores, so the language-model loss gives the router no
    gradient: it learns from the balancing loss alone (Switch Transformer's top-1 keeps the raw
    probability as the gate instead). With k = 2 the loss reaches it. The MoE sweep's k = 1 designs are
    read with this in mind."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    grads = {}
    for k in (1, 2):
        moe = MoEFeedForward(16, 32, num_experts=4, top_k=k)
        torch.nn.init.normal_(moe.router.weight, std=0.5)
        out, routing = moe(x)
        out.pow(2).sum().backward(retain_graph=True)               # any loss of the layer's output
        grads[k] = moe.router.weight.grad.abs().max().item()
        moe.router.weight.grad = None
        balancing_loss([routing]).backward()
        assert moe.router.weight.grad.abs().max().item() > 1e-4  # the balancing loss reaches it either way
    assert grads[2] > 1e-6 and grads[1] < 1e-6 * grads[2]         # k = 1: zero up to rounding (w / w)
