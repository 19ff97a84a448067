"""Tests that protect the README's promises (issue #17). Each would fail if the behaviour it names
broke; the closing note of the issue lists the mutation tried against each."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import curve
from llm_nb_utils import checkpoint as ckpt
from llm_nb_utils import data as data_mod
from llm_nb_utils import report, tracking
from llm_nb_utils import engine, step
from llm_nb_utils.train import train_model
from llm_nb_utils.config import PRESETS, Config, make_config, parse_overrides
from llm_nb_utils.env import REPO
from llm_nb_utils.arms import ARM_NAMES, build_model
from llm_nb_utils.prepare import prepare_data

quiet = dict(progress=False, log=lambda *_: None)


@pytest.fixture(autouse=True)
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def cfg(**kw):
    return make_config("smoke", **{"device": "cpu", "wandb_mode": "disabled", **kw})


def fresh(src, dst):
    shutil.copytree(src / "data", dst / "data")
    return dst


def same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def count_training_calls(model, on_call=None) -> dict:
    """Wrap `model.forward` to count its training calls, calling `on_call(n)` at each; the count."""
    calls = {"n": 0}
    original = model.forward

    def forward(*a, **k):
        if model.training:
            calls["n"] += 1
            if on_call:
                on_call(calls["n"])
        return original(*a, **k)
    model.forward = forward
    return calls


def interrupt_at(step: int):
    """build_model whose training forward sends this process SIGINT at its `step`-th call."""
    def build(name, c):
        model = build_model(name, c)
        count_training_calls(model, lambda n: n == step and os.kill(os.getpid(), signal.SIGINT))
        return model
    return build


KILL_AFTER_SAVE = """
import json, os, signal, sys
from llm_nb_utils import checkpoint, train
from llm_nb_utils.config import Config
real = checkpoint.save_checkpoint
def save(state, d, step, *a, **k):
    path = real(state, d, step, *a, **k)
    if state["reason"] == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)      # kill -9, right after this checkpoint is on disk
    return path
checkpoint.save_checkpoint = save
train.train_model(sys.argv[1], Config(**json.loads(sys.argv[4])), sys.argv[2], progress=False)
"""


def killed_after(name, c, run, reason):
    """Train in a process of its own that is killed (-9) right after writing its first `reason` checkpoint."""
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, name, str(run), reason, json.dumps(c.to_dict())],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == -signal.SIGKILL, r.stderr


# --- 1. resume under the real schedule ------------------------------------------------------------

SCHEDULE = dict(max_steps=16, eval_freq=4, checkpoint_every=4, lr_schedule="cosine", warmup_steps=4, test_windows=5)


@pytest.mark.slow
@pytest.mark.parametrize("name, drop, how", [("gpt2", 0.0, "sigint"), ("moe_gqa", 0.0, "sigint"),
                                             ("gpt2", 0.1, "sigint"), ("moe_gqa", 0.1, "kill"),
                                             ("gpt2", 0.0, "kill")])
def test_resume_under_cosine_warmup_is_bitwise_the_uninterrupted_run(prepared_run, tmp_path, monkeypatch,
                                                                     name, drop, how):
    c = cfg(drop_rate=drop, **SCHEDULE)
    straight = train_model(name, c, fresh(prepared_run, tmp_path / "a"), **quiet)
    run = fresh(prepared_run, tmp_path / "b")
    if how == "sigint":
        monkeypatch.setattr(engine, "build_model", interrupt_at(6))       # mid-warm-up
        with pytest.raises(KeyboardInterrupt):
            train_model(name, c, run, **quiet)
        monkeypatch.setattr(engine, "build_model", build_model)
    else:
        killed_after(name, c, run, "periodic")                              # at step 4
    assert ckpt.latest_checkpoint(run / "checkpoints" / name).name in ("step_00000004.pt", "step_00000006.pt")
    resumed = train_model(name, c, run, **quiet)
    assert curve(resumed["history"]) == curve(straight["history"])
    same_weights(straight["model"].state_dict(), resumed["model"].state_dict())


# --- 2. epoch boundaries ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_plays(tiny_corpus, tmp_path_factory):
    """A split small enough for two whole epochs in seconds: two plays, 19 batches of 8 per epoch."""
    d = tmp_path_factory.mktemp("two_plays")
    (d / "c").mkdir()
    for f in sorted(tiny_corpus.iterdir())[:2]:
        shutil.copyfile(f, d / "c" / f.name)
    prepare_data(d / "c", d / "run" / "data", log=lambda *_: None)
    return d / "run"


EPOCHS = dict(max_steps=0, max_epochs=2, batch_size=8, eval_freq=5, checkpoint_every=1000, warmup_steps=3,
              test_windows=5)


@pytest.mark.slow
def test_two_epochs_resumed_at_the_epoch_end_checkpoint_and_mid_epoch_2(two_plays, tmp_path, monkeypatch):
    c = cfg(**EPOCHS)
    epochs_started = []
    real_set_epoch = data_mod.EpochBatchSampler.set_epoch

    def record(self, epoch, start=0):
        if self.shuffle:
            epochs_started.append((epoch, start))
        return real_set_epoch(self, epoch, start)
    monkeypatch.setattr(data_mod.EpochBatchSampler, "set_epoch", record)
    straight = train_model("gpt2", c, fresh(two_plays, tmp_path / "a"), **quiet)
    per_epoch = straight["steps"] // 2
    assert straight["epochs_completed"] == 2 and epochs_started == [(0, 0), (1, 0)]

    at_boundary = fresh(two_plays, tmp_path / "b")
    killed_after("gpt2", c, at_boundary, "epoch")                            # kill -9 after the epoch-1 checkpoint
    assert ckpt.latest_checkpoint(at_boundary / "checkpoints" / "gpt2").name == f"step_{per_epoch:08d}.pt"
    epochs_started.clear()
    resumed = train_model("gpt2", c, at_boundary, **quiet)
    assert epochs_started == [(1, 0)]                                       # epoch 2, from its first batch
    assert curve(resumed["history"]) == curve(straight["history"])
    same_weights(straight["model"].state_dict(), resumed["model"].state_dict())

    mid = fresh(two_plays, tmp_path / "c")
    monkeypatch.setattr(engine, "build_model", interrupt_at(per_epoch + 5))
    with pytest.raises(KeyboardInterrupt):
        train_model("gpt2", c, mid, **quiet)
    monkeypatch.setattr(engine, "build_model", build_model)
    epochs_started.clear()
    resumed = train_model("gpt2", c, mid, **quiet)
    assert epochs_started == [(1, 5)]                                       # epoch 2, batch 5
    assert curve(resumed["history"]) == curve(straight["history"])
    same_weights(straight["model"].state_dict(), resumed["model"].state_dict())


# --- 3. export from a trained run ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "moe_gqa"])
def test_export_of_a_trained_run_reproduces_its_logits(prepared_run, tmp_path, name):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from llm_nb_utils.export_hf import export_run
    run = fresh(prepared_run, tmp_path / "run")
    trained = train_model(name, cfg(max_steps=12), run, **quiet)["model"].eval()
    hf = AutoModelForCausalLM.from_pretrained(export_run(run, name)).eval()
    x = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        ours, theirs = trained(x).logits, hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - build_model(name, trained.cfg).eval()(x).logits).abs().max().item() > 1e-2   # trained != init


# --- 5. fp16 with a GradScaler that scales --------------------------------------------------------------

def overflow_at(step: int):
    """build_model whose gradients of one weight become inf at training step `step` (not the loss)."""
    def build(name, c):
        model = build_model(name, c)
        calls = count_training_calls(model)
        model.blocks[0].attn.out_proj.weight.register_hook(
            lambda g: g * float("inf") if calls["n"] == step else g)
        return model
    return build


def test_an_fp16_gradient_overflow_skips_the_step_halves_the_scale_and_resumes_it(prepared_run, tmp_path, monkeypatch):
    half = dict(dtype="float16", force_dtype=True, checkpoint_every=100, eval_freq=100, lr_schedule="constant",
                warmup_steps=0, test_windows=2)
    two = train_model("gpt2", cfg(max_steps=2, **half), fresh(prepared_run, tmp_path / "two"), **quiet)
    monkeypatch.setattr(engine, "build_model", overflow_at(3))
    run = fresh(prepared_run, tmp_path / "three")
    three = train_model("gpt2", cfg(max_steps=3, **half), run, **quiet)     # no NonFiniteLossError
    monkeypatch.setattr(engine, "build_model", build_model)
    same_weights(two["model"].state_dict(), three["model"].state_dict())          # step 3 was skipped
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints" / "gpt2"))["scaler"]["scale"] == 2.0 ** 15
    train_model("gpt2", cfg(max_steps=5, **half), run, **quiet)              # resumed: the scale stays
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints" / "gpt2"))["scaler"]["scale"] == 2.0 ** 15


# --- 6. report.py ----------------------------------------------------------------------------------------

def metrics_pair(**changes):
    base = {"test_loss": 4.0, "test_perplexity": math.exp(4.0), "train_time_s": 100.0, "peak_memory_mb": 1000.0,
            "tokens_per_s": 2000.0, "total_params": 16_000_000, "active_params": 16_000_000,
            "flops_per_token": 100_000_000, "tokens_seen": 300_000, "steps": 300, "preset": "paper",
            "device": "cuda", "device_name": "NVIDIA H200", "peak_memory_kind": "cuda_max_memory_allocated_mb"}
    moe = {**base, "test_loss": 3.9, "test_perplexity": math.exp(3.9), "tokens_per_s": 1500.0,
           "total_params": 20_000_000, "active_params": 17_000_000, "peak_memory_mb": 900.0}
    for k, v in changes.items():
        model, key = k.split("__")
        (base if model == "gpt2" else moe)[key] = v
    return {"gpt2": base, "moe_gqa": moe}


def metrics_three(**changes):
    """The pair plus a Dense-GQA between them, with per-window test losses on the same windows."""
    import numpy as np
    m = metrics_pair(**changes)
    m = {"gpt2": m["gpt2"], "dense_gqa": {**m["gpt2"], "test_loss": 3.95, "test_perplexity": math.exp(3.95),
                                            "active_params": 16_900_000, "total_params": 16_900_000},
         "moe_gqa": m["moe_gqa"]}
    difficulty = np.random.default_rng(0).normal(0, 1, 400)
    for name, noise in (("gpt2", 1), ("dense_gqa", 2), ("moe_gqa", 3)):
        losses = m[name]["test_loss"] + difficulty + np.random.default_rng(noise).normal(0, 0.05, 400)
        losses += m[name]["test_loss"] - losses.mean()               # the mean is the reported loss
        m[name] |= {"test_window_losses": losses.tolist(), "test_loss_ci": [m[name]["test_loss"] - 0.1,
                                                                            m[name]["test_loss"] + 0.1],
                    "evaluation": {"test": {"fingerprint": "same", "description": "400 of 4,000 windows"}}}
    return m


def test_variation_sign_and_a_zero_denominator():
    assert report.variation_pct(100, 110) == pytest.approx(10.0)
    assert report.variation_pct(100, 90) == pytest.approx(-10.0)
    assert math.isnan(report.variation_pct(0, 5))
    t2 = report.table2(metrics_pair())
    assert t2.loc["test_loss", "moe_gqa_vs_gpt2_pct"] == pytest.approx(-2.5)
    assert t2.loc["tokens_per_s", "moe_gqa_vs_gpt2_pct"] == pytest.approx(-25.0)
    assert list(t2.columns) == ["gpt2", "moe_gqa", "moe_gqa_vs_gpt2_pct", "moe_gqa_vs_gpt2_ci_low",
                                "moe_gqa_vs_gpt2_ci_high"]
    assert t2["moe_gqa_vs_gpt2_ci_low"].isna().all()          # no window losses kept: no paired interval


def test_three_arms_decompose_the_difference_with_paired_intervals():
    m = metrics_three()
    t2 = report.table2(m)
    arch, experts, both = (t2.loc["test_loss", f"{b}_vs_{a}_pct"] for a, b in
                           (("gpt2", "dense_gqa"), ("dense_gqa", "moe_gqa"), ("gpt2", "moe_gqa")))
    assert arch == pytest.approx(-1.25) and experts == pytest.approx((3.9 - 3.95) / 3.95 * 100)
    assert both == pytest.approx(-2.5)
    for a, b in (("gpt2", "dense_gqa"), ("dense_gqa", "moe_gqa"), ("gpt2", "moe_gqa")):
        col = f"{b}_vs_{a}"
        low, high = t2.loc["test_loss", f"{col}_ci_low"], t2.loc["test_loss", f"{col}_ci_high"]
        assert low < t2.loc["test_loss", f"{col}_pct"] < high and high - low < 1.0     # paired: narrow
    shown = report.pretty(t2, "cuda_max_memory_allocated_mb")
    assert list(shown.columns) == ["GPT-2 baseline", "Dense-GQA", "MoE-GQA", "Dense-GQA vs GPT-2 baseline",
                                   "MoE-GQA vs Dense-GQA", "MoE-GQA vs GPT-2 baseline"]
    assert shown.loc["Test loss", "GPT-2 baseline"] == "4.0000 ± 0.1000"
    assert shown.loc["Test loss", "Dense-GQA vs GPT-2 baseline"].startswith("-1.25% [")
    text = report.discussion(m)
    assert "GPT-2 baseline → Dense-GQA (the architecture): test loss 4.0000 → 3.9500, -1.25%" in text
    assert "Dense-GQA → MoE-GQA (the experts)" in text and "larger than the evaluation's own noise" in text
    assert "400 of 4,000 windows" in text


def test_pretty_formats_and_memory_labels():
    t2 = report.table2(metrics_pair())
    gpu = report.pretty(t2, "cuda_max_memory_allocated_mb")
    col = "MoE-GQA vs GPT-2 baseline"
    assert gpu.loc["Test loss", "GPT-2 baseline"] == "4.0000" and gpu.loc["Test perplexity", "MoE-GQA"] == "49.40"
    assert gpu.loc["Throughput (tokens/s)", "GPT-2 baseline"] == "2,000"
    assert gpu.loc["Total parameters", "MoE-GQA"] == "20,000,000"
    assert gpu.loc["Test loss", col] == "-2.50%" and gpu.loc["Peak VRAM (MB)", col] == "-10.0%"   # loss rows: 2 decimals
    cpu = report.pretty(t2, "process_peak_rss_mb")
    assert "Peak RAM, process RSS (MB)" in cpu.index and "Peak VRAM (MB)" not in cpu.index


def test_every_branch_of_the_discussion():
    agree = report.discussion(metrics_pair())
    assert "GPT-2 baseline → MoE-GQA: test loss 4.0000 → 3.9000, -2.50%" in agree
    assert "agrees with the study's" in agree
    assert "MoE-GQA 0.75x (1,500 vs 2,000 tokens/s)" in agree and "GPU memory" in agree
    assert "Caution" not in agree and "Scope" not in agree
    opposite = report.discussion(metrics_pair(moe_gqa__test_loss=4.2, moe_gqa__test_perplexity=math.exp(4.2)))
    assert "+5.00%" in opposite and "is the opposite of the study's" in opposite
    unequal = report.discussion(metrics_pair(moe_gqa__tokens_seen=200_000, moe_gqa__steps=200))
    assert "saw different amounts of data (GPT-2 baseline 300,000 tokens, MoE-GQA 200,000 tokens)" in unequal
    cpu = report.discussion(metrics_pair(gpt2__preset="small", gpt2__device="cpu", gpt2__device_name="CPU (x86_64)",
                                         gpt2__peak_memory_kind="process_peak_rss_mb"))
    assert "`small` preset on CPU (x86_64)" in cpu and "process peak RSS" in cpu
    added = report.discussion(metrics_pair(gpt2__rss_before_model_mb=400.0, gpt2__memory_added_mb=600.0,
                                           moe_gqa__rss_before_model_mb=400.0, moe_gqa__memory_added_mb=500.0))
    assert "(400 MB before GPT-2 baseline's model was built)" in added and "MoE-GQA 500 MB (-16.7%)" in added
    warned = report.discussion(metrics_pair(gpt2__warnings=["only 30 training steps"]))
    assert "Caution (GPT-2 baseline):** only 30 training steps." in warned
    timed = {"gpt2": [[1.0, 1.0], [1.2, 1.2]], "moe_gqa": [[2.0, 2.0], [2.0, 2.0]]}
    speed = report.speed_comparison(timed, 1000)
    assert speed["ratios"]["moe_gqa"] == (pytest.approx(0.55), pytest.approx(0.5), pytest.approx(0.6))
    slow = report.discussion(metrics_pair(), speed)           # training said 0.75x, side by side 0.55x
    assert "side by side 0.55x (0.50 to 0.60 over rounds): the training runs disagree" in slow


# --- 7. W&B never blocks or fails a run ------------------------------------------------------------------

def test_wandb_failures_turn_tracking_off_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.init_tracking(cfg(wandb_mode="disabled"), tmp_path, "gpt2").message == "W&B: disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")                 # the environment wins over the setting
    assert tracking.init_tracking(cfg(wandb_mode="offline"), tmp_path, "gpt2").mode == "disabled"
    monkeypatch.delenv("WANDB_MODE")

    def boom(*a, **k):
        raise RuntimeError("no service")
    monkeypatch.setattr(wandb, "init", boom)
    t = tracking.init_tracking(cfg(wandb_mode="offline"), tmp_path, "gpt2")
    assert not t.active and "could not start (RuntimeError: no service)" in t.message

    class Run:
        def log(self, *a, **k):
            raise OSError("disk full")
    t = tracking.Tracker(Run(), "offline")
    t.log({"x": 1})
    t.log({"x": 2})                                              # turned off after the first: one message
    assert not t.active and capsys.readouterr().out.count("tracking turned off") == 1

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(tracking, "_has_api_key", lambda: False)
    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **k: seen.update(k) or type("R", (), {"dir": str(tmp_path)})())
    t = tracking.init_tracking(cfg(wandb_mode="online"), tmp_path, "gpt2")
    assert seen["mode"] == "offline" and "no API key found" in t.message


# --- 8. the Gutenberg retry policy -------------------------------------------------------------------------

@pytest.fixture
def gutenberg_server():
    from test_gutenberg import Server
    s = Server()
    yield s
    s.httpd.shutdown()


def test_backoff_doubles_429_is_retried_403_is_not(gutenberg_server):
    from llm_nb_utils.gutenberg import GutenbergError, fetch
    s, sleeps = gutenberg_server, []
    url = s.url + "/cache/epub/101/pg101.txt"
    s.fail_next["/cache/epub/101/pg101.txt"] = 10
    with pytest.raises(GutenbergError, match="after 4 attempt"):
        fetch(url, retries=3, backoff=0.5, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0, 2.0]
    for code, attempts in ((429, 2), (403, 1)):
        s.hits.clear()
        s.fail_next["/cache/epub/101/pg101.txt"] = 1
        s.fail_code = code
        try:
            fetch(url, retries=3, backoff=0, sleep=lambda _: None)
        except GutenbergError:
            pass
        assert s.hits.count("/cache/epub/101/pg101.txt") == attempts, code


def test_a_book_that_exhausts_its_retries_or_is_not_utf8_does_not_stop_the_download(gutenberg_server, tmp_path):
    from llm_nb_utils.gutenberg import download_portuguese_corpus
    s, logs = gutenberg_server, []
    s.fail_next["/cache/epub/101/pg101.txt"] = 100                 # always 503
    s.routes["/cache/epub/103/pg103.txt"] = "Cora\xe7\xe3o".encode("latin-1")    # not UTF-8
    books = download_portuguese_corpus(tmp_path, target_mb=1, base_url=s.url, retries=2, log=logs.append,
                                       sleep=lambda _: None)
    assert sorted(p.name for p in books.iterdir()) == ["pg106.txt"]
    summary = next(line for line in logs if line.startswith("Gutenberg (pt)"))
    assert "1 failed after retries and left for a re-run: [101]" in summary
    assert "2 without a UTF-8 plain-text file" in summary           # 103 (latin-1) and 105 (404)


# --- 9. presets and the config object ------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_every_arm_and_round_trips(preset):
    c = make_config(preset, device="cpu")
    assert Config(**c.to_dict()) == c and Config(**c.to_dict()).preset == preset
    with torch.device("meta"):                    # shapes only: the paper preset without its 0.4 GB
        for name in ARM_NAMES:
            model = build_model(name, c)
            assert model.cfg.emb_dim == c.emb_dim and len(model.blocks) == c.n_layers


@pytest.mark.parametrize("text", ["0.7,0.2,0.1", "(0.7, 0.2, 0.1)", "[0.7, 0.2, 0.1]"])
def test_tuple_overrides_parse(text):
    assert make_config("smoke", parse_overrides([f"split_ratios={text}"])).split_ratios == (0.7, 0.2, 0.1)


# --- 10. the GPU check can fail ----------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_exits_non_zero_naming_the_stages_that_failed(tiny_corpus, tmp_path):
    env = {**os.environ, "CARRY": str(tmp_path / "carry"), "PYTHON": sys.executable, "DEVICE": "cpu",
           "PRESET": "no-such-preset", "BUDGET": "100000", "TRAIN_STEPS": "1"}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "run", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "gpu_check FAILED" in r.stdout and "bench (exit 1)" in r.stdout and "short_train (exit 1)" in r.stdout
    assert "gpu_check finished" not in r.stdout


def test_peak_tflops_matches_whole_model_names():
    from test_benchmarks import load
    bench = load("train_throughput")
    assert bench.peak_tflops("NVIDIA L40S", "bfloat16") is None            # not an L4
    assert bench.peak_tflops("NVIDIA L4", "bfloat16") == 121.0
    assert bench.peak_tflops("NVIDIA A10G", "float32") is None             # not an A10
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0


def test_the_study_columns_show_its_loss_variation_as_everywhere_else():
    """One rounding of the study's figures: its test-loss variation reads -1.75%, as in the prose."""
    t = report.table2_with_study(metrics_pair())
    study = t[[c for c in t.columns if c[0].startswith("The study")]]
    assert study.loc["Test loss"].iloc[-1] == "-1.75%" and study.loc["Test perplexity"].iloc[-1] == "-5.55%"
    assert "-13.0%" in study.iloc[:, -1].tolist()                         # memory: one decimal, as before
