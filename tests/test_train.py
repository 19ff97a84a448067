import json
import math
import os
import shutil
import signal

import pytest
import torch

from conftest import curve
from llm_nb_utils import checkpoint as ckpt
from llm_nb_utils import device as dev
from llm_nb_utils import engine, step
from llm_nb_utils.train import train_model
from llm_nb_utils.config import make_config
from llm_nb_utils.arms import build_model

quiet = dict(progress=False, log=lambda *_: None)


@pytest.fixture
def run(prepared_run, tmp_path):
    """A fresh run directory sharing the session's prepared data."""
    d = tmp_path / "run"
    shutil.copytree(prepared_run / "data", d / "data")
    return d


def cfg(**kw):
    return make_config("smoke", device="cpu", **kw)


@pytest.mark.parametrize("name", ["gpt2", "moe_gqa"])
def test_smoke_training_learns_and_writes_the_metrics_contract(run, name):
    m = train_model(name, cfg(max_steps=30, eval_freq=10), run, **quiet)
    hist = m["history"]
    assert [h["step"] for h in hist] == [10, 20, 30]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.3
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.3
    saved = json.loads((run / "metrics" / f"{name}.json").read_text())
    for key in ["test_loss", "test_perplexity", "train_time_s", "tokens_per_s", "peak_memory_mb",
                "peak_memory_kind", "total_params", "active_params", "flops_per_token", "tokens_seen",
                "steps", "device", "dtype", "torch_version", "history"]:
        assert key in saved, key
    assert saved["test_perplexity"] == pytest.approx(math.exp(saved["test_loss"]))
    assert saved["steps"] == 30 and saved["tokens_seen"] == 30 * 4 * 32
    assert saved["peak_memory_kind"] == "process_peak_rss_mb" and saved["peak_memory_mb"] > 0
    # what the model and training add: the peak less the RSS before the model, which torch alone exceeds
    assert saved["rss_before_model_mb"] > 100 and 0 < saved["memory_added_mb"] < saved["peak_memory_mb"]
    assert saved["memory_added_mb"] == pytest.approx(saved["peak_memory_mb"] - saved["rss_before_model_mb"])
    assert saved["tokens_per_s"] > 0 and saved["device"] == "cpu" and saved["dtype"] == "float32"
    point = {"step", "tokens_seen", "train_loss", "val_loss", "time_s"}
    assert set(saved["history"][0]) == point | ({"expert_share"} if name == "moe_gqa" else set())
    times = [h["time_s"] for h in hist]
    assert times == sorted(times) and times[0] > 0 and times[-1] <= saved["train_time_s"]
    samples = json.loads((run / "metrics" / f"{name}_samples.json").read_text())
    assert len(samples) >= 2 and all(s["text"].startswith("lisboa") for s in samples)
    if name == "moe_gqa":
        util = saved["expert_utilisation"]
        assert len(util) == 2 and all(abs(sum(r) - 1) < 1e-6 for r in util)
        for h in hist:                      # utilisation over training, at every evaluation point
            assert len(h["expert_share"]) == 2 and all(abs(sum(r) - 1) < 1e-6 for r in h["expert_share"])
    # W&B ran offline and wrote its run folder under the run directory.
    assert list((run / "wandb").glob("offline-run-*"))


def test_resume_continues_exactly(run, tmp_path):
    c = cfg(max_steps=12, eval_freq=3, checkpoint_every=100, lr_schedule="constant", warmup_steps=0)
    straight = train_model("gpt2", c, run, **quiet)

    other = tmp_path / "other"
    shutil.copytree(run / "data", other / "data")
    train_model("gpt2", c.replace(max_steps=6), other, **quiet)
    resumed = train_model("gpt2", c, other, **quiet)
    assert resumed["steps"] == 12
    assert curve(resumed["history"]) == curve(straight["history"])
    for (k, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed["test_loss"] == straight["test_loss"]


def test_finished_run_is_reused_not_retrained(run):
    c = cfg(max_steps=5)
    train_model("gpt2", c, run, **quiet)
    msgs = []
    again = train_model("gpt2", c, run, progress=False, log=msgs.append)
    assert any("already trained" in m for m in msgs) and again["steps"] == 5


def test_resume_with_other_shapes_is_refused(run):
    train_model("gpt2", cfg(max_steps=4), run, **quiet)
    with pytest.raises(engine.ResumeError, match="emb_dim: checkpoint 64 vs now 32"):
        train_model("gpt2", cfg(max_steps=8, emb_dim=32, head_dim=8), run, **quiet)
    fresh = train_model("gpt2", cfg(max_steps=2, emb_dim=32, head_dim=8), run, resume=False, **quiet)
    assert fresh["steps"] == 2 and list((run / "checkpoints").glob("gpt2.old-*"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"x": 1}, tmp_path, 10)
    real_save = torch.save

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"x": 2}, tmp_path, 20)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000010.pt"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)) == {"x": 1}
    for s in (30, 40, 50):
        ckpt.save_checkpoint({"x": s}, tmp_path, s, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000040.pt", "step_00000050.pt"]


def poisoned(after: int, action):
    """build_model whose forward calls `action(step)` from its `after`-th training call on."""
    def build(name, c):
        model = build_model(name, c)
        calls = {"n": 0}
        original = model.forward

        def forward(*a, **k):
            out = original(*a, **k)
            if model.training:
                calls["n"] += 1
                if calls["n"] >= after:
                    out = action(out) or out
            return out
        model.forward = forward
        return model
    return build


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(run, monkeypatch):
    def nan(out):
        out.loss = out.loss * float("nan")
    monkeypatch.setattr(engine, "build_model", poisoned(13, nan))
    with pytest.raises(engine.NonFiniteLossError, match="non-finite at step 13.*step_00000010.pt"):
        train_model("gpt2", cfg(max_steps=30, checkpoint_every=10, log_every=5), run, **quiet)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints" / "gpt2")] == ["step_00000010.pt"]
    state = ckpt.load_checkpoint(run / "checkpoints" / "gpt2" / "step_00000010.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_interrupt_saves_and_resume_finishes(run, monkeypatch):
    def interrupt(out):
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(engine, "build_model", poisoned(7, interrupt))
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 7"):
        train_model("gpt2", cfg(max_steps=20), run, **quiet)
    assert ckpt.latest_checkpoint(run / "checkpoints" / "gpt2").name == "step_00000007.pt"
    monkeypatch.setattr(engine, "build_model", build_model)
    assert train_model("gpt2", cfg(max_steps=20), run, **quiet)["steps"] == 20


def test_learning_rate_schedule():
    c = cfg(lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = [step.lr_factor(s, c, 110) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)
    assert step.lr_factor(50, c.replace(lr_schedule="constant"), 110) == 1.0


def test_weight_decay_spares_norms_biases_and_embeddings():
    model = build_model("gpt2", cfg(bias=True, tie_embeddings=False))
    opt = step.make_optimizer(model, model.cfg)
    assert opt.defaults["fused"]            # one pass per tensor, on the CPU too
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "out_head.weight" in names and "blocks.0.ff.fc.weight" in names
    assert not any("norm" in n or n.endswith(".bias") or "emb" in n for n in names)


def test_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    p = dev.resolve_precision("bfloat16", cpu)
    assert p.dtype == "float32" and "CPU" in p.note
    assert dev.resolve_precision("bfloat16", cpu, force=True).autocast_dtype == torch.bfloat16
    p = dev.resolve_precision("float16", cpu, force=True)
    assert (p.autocast_dtype, p.use_grad_scaler) == (torch.float16, True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (6, 0))
    p = dev.resolve_precision("bfloat16", torch.device("cuda"))
    assert (p.dtype, p.use_grad_scaler) == ("float16", True) and "no native bfloat16" in p.note
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    p = dev.resolve_precision("bfloat16", torch.device("cuda"))
    assert (p.dtype, p.use_grad_scaler) == ("bfloat16", False)


@pytest.mark.parametrize("name", ["gpt2", "moe_gqa"])
def test_float16_with_grad_scaler_trains_like_float32(run, tmp_path, name):
    """The P100 / T4 path (fp16 autocast + GradScaler + fused AdamW), run for real on the CPU:
    it follows the fp32 run (measured: every loss within 2e-5 for GPT-2, 1.9e-4 for MoE-GQA) and
    its scaler state goes into the checkpoints."""
    c = cfg(max_steps=12, eval_freq=4, checkpoint_every=100, test_windows=10)
    ref = train_model(name, c, run, **quiet)
    other = tmp_path / "fp16"
    shutil.copytree(run / "data", other / "data")
    half = train_model(name, c.replace(dtype="float16", force_dtype=True), other, **quiet)
    assert half["dtype"] == "float16"
    for a, b in zip(half["history"], ref["history"]):
        assert abs(a["val_loss"] - b["val_loss"]) < 5e-3 and abs(a["train_loss"] - b["train_loss"]) < 5e-3
    assert ref["history"][-1]["val_loss"] < ref["history"][0]["val_loss"] - 0.2     # it did learn
    assert abs(half["test_loss"] - ref["test_loss"]) < 5e-3
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(other / "checkpoints" / name))
    assert saved["scaler"]["scale"] == 2.0 ** 16      # enabled (a disabled scaler saves {}), no overflow


def test_missing_or_unsupported_gpu_is_explained(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(dev.DeviceError, match="device=cpu"):
        dev.resolve_device("cuda")
    assert dev.resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "compute_90"])
    with pytest.raises(dev.DeviceError, match="no kernels for Tesla P100.*sm_60"):
        dev.check_gpu_supported()
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_60", "sm_70"])
    dev.check_gpu_supported()


def test_peak_rss_can_be_reset_between_models():
    import mmap

    import numpy as np
    from llm_nb_utils.memory import peak_rss_mb, reset_peak_rss
    assert reset_peak_rss()
    before = peak_rss_mb()
    # An anonymous mapping, not malloc: with make's GLIBC_TUNABLES freed heap stays resident and
    # a malloc'd array could reuse pages already counted.
    block = mmap.mmap(-1, 300 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1            # touch every page
    assert peak_rss_mb() > before + 250
    block.close()
    assert reset_peak_rss()
    assert peak_rss_mb() < before + 150


def test_compile_only_where_triton_can(monkeypatch):
    model, msgs = torch.nn.Linear(2, 2), []
    assert dev.maybe_compile(model, False, torch.device("cpu"), msgs.append) is model and not msgs
    assert dev.maybe_compile(model, True, torch.device("cpu"), msgs.append) is model and "CUDA" in msgs[-1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla P100-PCIE-16GB")
    assert dev.maybe_compile(model, True, torch.device("cuda"), msgs.append) is model
    assert "Triton does not support Tesla P100" in msgs[-1]
