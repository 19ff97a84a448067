"""Exported models load in transformers (CPU, fp32, offline) and compute what ours compute."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from llm_nb_utils.config import make_config  # noqa: E402
from llm_nb_utils.export_hf import ExportError, export_hf, to_hf  # noqa: E402
from llm_nb_utils.generate import generate  # noqa: E402
from llm_nb_utils.accounting import count_params  # noqa: E402
from llm_nb_utils.arms import ARM_NAMES, ARMS, build_model  # noqa: E402
from llm_nb_utils.tokenizer import encode  # noqa: E402


def randomise(model):
    """Random weights everywhere, norms and biases included, so that no mapping hides behind 1s and 0s."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.3) + (1.0 if p.dim() == 1 else 0))
    return model.eval()


def max_logit_diff(model, hf, batch):
    with torch.no_grad():
        return (model(batch).logits - hf(batch).logits).abs().max().item()


CASES = {
    "gpt2": dict(),
    "gpt2_bias_untied": dict(bias=True, tie_embeddings=False),
    "moe_gqa": dict(),
    "moe_gqa_bias_untied": dict(bias=True, tie_embeddings=False, n_kv_groups=1, num_experts=3,
                                num_experts_per_token=1),
    "dense_gqa": dict(),
    "dense_gqa_bias_untied_iso_total": dict(bias=True, tie_embeddings=False, dense_ff_width=4 * 128),
}


@pytest.mark.parametrize("case", CASES)
def test_small_models_match_transformers(case, tmp_path):
    name = next(n for n in ARM_NAMES if case.startswith(n))
    cfg = make_config("smoke", device="cpu", rope_base=500.0, norm_eps=1e-6, **CASES[case])
    model = randomise(build_model(name, cfg))
    out = export_hf(model, tmp_path / case)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == ARMS[name].hf_class
    if name != "gpt2" or cfg.bias:      # GPT2LMHeadModel always has biases (zeros when we have none)
        assert hf.num_parameters() == count_params(model)["total_params"]
    batch = torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=torch.Generator().manual_seed(0))
    diff = max_logit_diff(model, hf, batch)
    print(f"{case}: max |logit difference| = {diff:.2e}")
    assert diff < 1e-4
    prompt = torch.tensor([encode("lisboa")])
    ours = generate(model, prompt, 15)
    theirs = hf.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=50256, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ARM_NAMES)
def test_paper_shapes_match_transformers(name):
    cfg = make_config("paper", device="cpu")
    model = randomise(build_model(name, cfg))
    hf = to_hf(model)
    if name != "gpt2":
        assert hf.num_parameters() == count_params(model)["total_params"]
    batch = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    diff = max_logit_diff(model, hf, batch)
    print(f"paper {name}: max |logit difference| = {diff:.2e}")
    assert diff < 1e-3


def test_export_leaves_the_callers_model_alone(tmp_path):
    model = build_model("gpt2", make_config("smoke", device="cpu")).to(torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_hf(model, tmp_path)
    after = model.state_dict()
    assert all(after[k].dtype == torch.float64 and torch.equal(after[k], v) for k, v in before.items())


def test_tokenizer_files_reproduce_tiktoken_ids(tmp_path):
    export_hf(build_model("gpt2", make_config("smoke", device="cpu")), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["lisboa", "Era uma vez, em Lisboa, à beira do Tejo: «Olá!»  Ação — 1899.\n\nFim.", " ąčę 😀"]:
        assert tok(text)["input_ids"] == encode(text)
    assert tok.eos_token_id == 50256


def test_settings_the_target_cannot_express_are_refused():
    for name in ("moe_gqa", "dense_gqa"):
        with pytest.raises(ExportError, match="QK-norm"):
            to_hf(build_model(name, make_config("smoke", device="cpu", qk_norm=False)))
    with pytest.raises(ExportError, match="n_heads \\* head_dim == emb_dim"):
        to_hf(build_model("gpt2", make_config("smoke", device="cpu", head_dim=8)))


def test_quiet_export_restores_the_callers_transformers_settings(tmp_path):
    from llm_nb_utils.export_hf import hf_generate
    logging = transformers.utils.logging
    logging.set_verbosity_info()
    logging.enable_progress_bar()
    try:
        path = export_hf(build_model("gpt2", make_config("smoke", device="cpu")), tmp_path)
        cls, text = hf_generate(path, "lisboa", max_new_tokens=3)
        assert cls == "GPT2LMHeadModel" and text.startswith("lisboa")
        assert logging.get_verbosity() == logging.INFO and logging.is_progress_bar_enabled()
    finally:
        logging.set_verbosity_warning()
