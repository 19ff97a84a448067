"""Export trained models to the Hugging Face `transformers` format, with the GPT-2 tokenizer.

Our GPT-2 baseline is architecturally `GPT2LMHeadModel`, our MoE-GQA model `Qwen3MoeForCausalLM`
and Dense-GQA `Qwen3ForCausalLM` (`arms.ARMS` names the class of each); every setting that changes the math is mapped explicitly, and a setting the
target class cannot express makes the export refuse rather than write a model that computes
something else.

    python -m llm_nb_utils.export_hf --run-dir outputs/run-paper --model moe_gqa --out outputs/hf/moe_gqa

`transformers` and `safetensors` are optional: only this module needs them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import Config
from .errors import SuiteError
from .files import storage_error
from .arms import ARM_NAMES
from .gpt2 import GPT2Model
from .qwen3 import DenseGQAModel, MoEGQAModel
from .runfolder import RunFolder, load_model_checkpoint
from .tokenizer import EOT_ID, get_tokenizer


class ExportError(SuiteError, ValueError):
    pass


def _require_transformers():
    try:
        with warnings.catch_warnings():   # e.g. tqdm's "IProgress not found" in a notebook
            warnings.simplefilter("ignore")
            import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("exporting needs transformers and safetensors: pip install transformers safetensors") from e


@contextmanager
def _quiet_transformers():
    """No progress bars or info logs in notebook outputs; the caller's settings come back after."""
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


# --- tokenizer files -------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used in vocab.json / merges.txt."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Apply the merges of rank < max_rank to `token`'s bytes: what is left is the pair merged last."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]


def write_gpt2_tokenizer(out_dir: str | Path, model_max_length: int) -> None:
    """vocab.json and merges.txt rebuilt from tiktoken's GPT-2 ranks (no download needed)."""
    enc = get_tokenizer()
    ranks: dict[bytes, int] = enc._mergeable_ranks
    b2u = _bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_ID
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            pair = _bpe_split(ranks, tok, rank)
            assert len(pair) == 2, tok
            merges.append(f"{to_str(pair[0])} {to_str(pair[1])}")
    out = Path(out_dir)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
         "add_prefix_space": False, **special}))


# --- GPT-2 ---------------------------------------------------------------------------------

def _gpt2_to_hf(model: GPT2Model):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = model.cfg
    if cfg.n_heads * cfg.head_dim != cfg.emb_dim:
        raise ExportError(f"GPT2LMHeadModel needs n_heads * head_dim == emb_dim (here {cfg.n_heads} x "
                          f"{cfg.head_dim} != {cfg.emb_dim}): it derives head_dim from the width.")
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.hidden_dim,
                        activation_function="gelu_new",          # GELU, tanh approximation
                        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.drop_rate, embd_pdrop=cfg.drop_rate,
                        attn_pdrop=cfg.drop_rate, scale_attn_weights=True, tie_word_embeddings=cfg.tie_embeddings,
                        bos_token_id=EOT_ID, eos_token_id=EOT_ID)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    sd = _cpu_fp32_state(model)
    new = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["final_norm.weight"], "transformer.ln_f.bias": sd["final_norm.bias"],
           "lm_head.weight": sd["out_head.weight"]}

    def linear(ours: str, theirs: str, out_features: int):
        new[f"{theirs}.weight"] = sd[f"{ours}.weight"].t().contiguous()     # Conv1D stores (in, out)
        bias = sd.get(f"{ours}.bias")
        new[f"{theirs}.bias"] = bias if bias is not None else torch.zeros(out_features)   # bias=False

    for i in range(cfg.n_layers):
        o, t = f"blocks.{i}", f"transformer.h.{i}"
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            new[f"{t}.{b}.weight"], new[f"{t}.{b}.bias"] = sd[f"{o}.{a}.weight"], sd[f"{o}.{a}.bias"]
        linear(f"{o}.attn.qkv", f"{t}.attn.c_attn", 3 * cfg.emb_dim)   # q, k, v in the same order
        linear(f"{o}.attn.out_proj", f"{t}.attn.c_proj", cfg.emb_dim)
        linear(f"{o}.ff.fc", f"{t}.mlp.c_fc", cfg.hidden_dim)
        linear(f"{o}.ff.proj", f"{t}.mlp.c_proj", cfg.emb_dim)
    _load_exact(hf, new)
    return hf


# --- MoE-GQA -> Qwen3-MoE -----------------------------------------------------------------------

def hf_aux_loss_coef(cfg: Config) -> float:
    """The `router_aux_loss_coef` that weighs transformers' load-balancing loss as ours is weighed.

    Ours is Switch-normalised over assignments: num_experts * sum_e f_e * P_e with f_e the share of
    the N * k assignments, 1.0 when balanced. transformers' `load_balancing_loss_func` takes the
    mean of the one-hot top-k mask over tokens, so its f_e sums to k: the same loss times k (and it
    pools the router logits of all layers before the products, where we average per-layer losses).
    Dividing the coefficient by k gives a fine-tuning run in transformers the same penalty."""
    return cfg.aux_loss_coef / cfg.num_experts_per_token


def _moe_to_hf(model: MoEGQAModel):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = _qwen3_exportable(model, "Qwen3MoeForCausalLM")
    hf_cfg = Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_groups, head_dim=cfg.head_dim,
        intermediate_size=cfg.moe_intermediate_size,   # dense MLP width: unused, every layer is sparse
        moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_token, norm_topk_prob=True,   # we renormalise the top-k
        decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        max_position_embeddings=cfg.context_length, attention_bias=cfg.bias, attention_dropout=cfg.drop_rate,
        tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False,
        router_aux_loss_coef=hf_aux_loss_coef(cfg), bos_token_id=EOT_ID, eos_token_id=EOT_ID)
    hf = Qwen3MoeForCausalLM(hf_cfg).eval()
    sd = _cpu_fp32_state(model)
    keys = set(hf.state_dict())
    new = _qwen3_shared_weights(sd, cfg)
    for i in range(cfg.n_layers):
        o, t = f"blocks.{i}", f"model.layers.{i}"
        new[f"{t}.mlp.gate.weight"] = sd[f"{o}.moe.router.weight"]
        gate, up, down = (sd[f"{o}.moe.experts.{w}"].transpose(1, 2) for w in ("w_gate", "w_up", "w_down"))
        if f"{t}.mlp.experts.gate_up_proj" in keys:          # transformers >= 5: experts fused in 3-D tensors
            new[f"{t}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
            new[f"{t}.mlp.experts.down_proj"] = down.contiguous()
        else:                                                  # transformers 4.x: one Linear per expert
            for e in range(cfg.num_experts):
                new[f"{t}.mlp.experts.{e}.gate_proj.weight"] = gate[e].contiguous()
                new[f"{t}.mlp.experts.{e}.up_proj.weight"] = up[e].contiguous()
                new[f"{t}.mlp.experts.{e}.down_proj.weight"] = down[e].contiguous()
    _load_exact(hf, new)
    return hf


def _qwen3_exportable(model, target: str) -> Config:
    """The model's config, or a refusal where the Qwen3 classes cannot express it."""
    if not model.cfg.qk_norm:
        raise ExportError(f"{target} always applies QK-norm; a model trained with qk_norm=False "
                          "cannot be expressed by it, so it is not exported.")
    return model.cfg


def _qwen3_shared_weights(sd: dict, cfg: Config) -> dict:
    """Embeddings, final norm, head, and each layer's norms and attention (QK-norm included): what
    MoE-GQA and Dense-GQA share, under transformers' Qwen3 names."""
    new = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["final_norm.weight"],
           "lm_head.weight": sd["out_head.weight"]}
    for i in range(cfg.n_layers):
        o, t = f"blocks.{i}", f"model.layers.{i}"
        new[f"{t}.input_layernorm.weight"] = sd[f"{o}.norm1.weight"]
        new[f"{t}.post_attention_layernorm.weight"] = sd[f"{o}.norm2.weight"]
        for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
            new[f"{t}.self_attn.{theirs}.weight"] = sd[f"{o}.attn.{ours}.weight"]
            if cfg.bias:
                new[f"{t}.self_attn.{theirs}.bias"] = sd[f"{o}.attn.{ours}.bias"]
        new[f"{t}.self_attn.q_norm.weight"] = sd[f"{o}.attn.q_norm.weight"]
        new[f"{t}.self_attn.k_norm.weight"] = sd[f"{o}.attn.k_norm.weight"]
    return new


# --- Dense-GQA -> Qwen3 ---------------------------------------------------------------------------

def _dense_to_hf(model: DenseGQAModel):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = _qwen3_exportable(model, "Qwen3ForCausalLM")
    hf_cfg = Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.dense_width,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_groups,
        head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        max_position_embeddings=cfg.context_length, attention_bias=cfg.bias, attention_dropout=cfg.drop_rate,
        tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False, bos_token_id=EOT_ID, eos_token_id=EOT_ID)
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    sd = _cpu_fp32_state(model)
    new = _qwen3_shared_weights(sd, cfg)
    for i in range(cfg.n_layers):
        o, t = f"blocks.{i}.ff", f"model.layers.{i}.mlp"
        # Ours are stored (in, out) for x @ w; transformers' Linear holds (out, in).
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            new[f"{t}.{theirs}.weight"] = sd[f"{o}.{ours}"].t().contiguous()
    _load_exact(hf, new)
    return hf


def _cpu_fp32_state(model) -> dict:
    """Copies of the weights on the CPU in fp32; the caller's model stays where and as it is."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()}


def _load_exact(hf, new: dict) -> None:
    """Every tensor of the target filled, nothing left over: a silent default would change the math."""
    target = hf.state_dict()
    tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
    missing = set(target) - set(new) - tied
    extra = set(new) - set(target) - tied
    if missing or extra:
        raise ExportError(f"weight mapping incomplete: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    for k, v in new.items():
        if k in target and target[k].shape != v.shape:
            raise ExportError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(target[k].shape)}")
    hf.load_state_dict({k: v for k, v in new.items() if k in target}, strict=not tied)
    if hf.config.tie_word_embeddings:
        hf.tie_weights()


def to_hf(model) -> "torch.nn.Module":
    """The equivalent transformers model, in memory."""
    _require_transformers()
    if isinstance(model, GPT2Model):
        return _gpt2_to_hf(model)
    if isinstance(model, MoEGQAModel):
        return _moe_to_hf(model)
    if isinstance(model, DenseGQAModel):
        return _dense_to_hf(model)
    raise ExportError(f"cannot export {type(model).__name__}")


def export_hf(model_or_checkpoint, out_dir: str | Path) -> Path:
    """Write a `save_pretrained` directory (config, safetensors, generation config, tokenizer)."""
    _require_transformers()
    from transformers import GenerationConfig
    model = model_or_checkpoint
    if isinstance(model, (str, Path)):
        model = load_model_checkpoint(model)
    hf = to_hf(model)
    out = Path(out_dir)
    # Written whole into a folder of its own, then swapped in: a kill or a full disk never leaves a
    # half-exported model under the final name.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with _quiet_transformers():
            hf.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID,
                         max_length=model.cfg.context_length).save_pretrained(tmp)
        write_gpt2_tokenizer(tmp, model.cfg.context_length)
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(e, out / "model.safetensors") from None
    return out


def export_run(run_dir: str | Path, name: str, out_dir: str | Path | None = None) -> Path:
    """Export the latest checkpoint of `name` in a run directory (default: <run_dir>/hf/<name>)."""
    folder = RunFolder(run_dir)
    ckpt = folder.latest_checkpoint(name)
    if ckpt is None:
        raise ExportError(f"no checkpoint of {name} under {folder.checkpoints(name)}: train it first")
    return export_hf(ckpt, out_dir or folder.export_dir(name))


def hf_generate(path: str | Path, prompt: str = "lisboa", max_new_tokens: int = 30) -> tuple[str, str]:
    """Load an exported folder with transformers' Auto classes, quietly, and decode greedily."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        ids = hf.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=EOT_ID)
    return type(hf).__name__, tok.decode(ids[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llm_nb_utils.export_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--model", nargs="+", default=list(ARM_NAMES), choices=ARM_NAMES)
    p.add_argument("--out", default="", help="output folder (default <run-dir>/hf/<model>)")
    args = p.parse_args(argv)
    try:
        for name in args.model:
            out = Path(args.out) / name if args.out and len(args.model) > 1 else (args.out or None)
            print(f"{name}: exported to {export_run(args.run_dir, name, out)}")
    except (ExportError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
