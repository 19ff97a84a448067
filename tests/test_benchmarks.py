"""The benchmark scripts run at a tiny size, so that they cannot rot. They report; nothing is timed here."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def load(script):
    spec = importlib.util.spec_from_file_location(script, REPO / "benchmarks" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_benchmark_reports_every_arm(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert load("train_throughput").main(["--preset", "smoke", "--device", "cpu", "--steps", "2", "--warmup", "1",
                                          "--batch-size", "2", "4", "--rounds", "2", "--peak-tflops", "1.0",
                                          "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["model"], r["batch_size"]) for r in data["results"]] == [
        ("gpt2", 2), ("dense_gqa", 2), ("moe_gqa", 2), ("gpt2", 4), ("dense_gqa", 4), ("moe_gqa", 4)]
    for r in data["results"]:
        assert r["eval_tokens_per_s"] > 0
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["timed_steps"] == 4                           # 2 steps in each of 2 rounds, pooled
        assert r["step_time_min_s"] <= r["step_time_s"] and r["tokens_per_s"] == r["batch_size"] * 32 / r["step_time_s"]
        assert r["achieved_tflops"] == r["flops_per_token"] * r["tokens_per_s"] / 1e12
        assert r["mfu"] == r["achieved_tflops"] / 1.0
    assert {k: set(v) for k, v in data["over_reference"].items()} == {"dense_gqa": {"2", "4"}, "moe_gqa": {"2", "4"}}
    from llm_nb_utils import moe
    assert {r.get("moe_dispatch") for r in data["results"]} == {None, "grouped" if moe._GROUPED_MM else "loop"}
    assert "MoE-GQA / GPT-2 baseline throughput at batch 2" in capsys.readouterr().out


def test_head_loss_benchmark_compares_the_vocabulary_cuts(tmp_path, capsys):
    out = tmp_path / "head.json"
    assert load("lm_head_loss").main(["--device", "cpu", "--rows", "24", "--emb-dim", "8", "--vocab", "200",
                                      "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["block"] for r in data["results"]] == [200, 192, None]     # whole, 64-aligned + tail, unfused
    assert data["default_block"] == 192
    for r in data["results"]:
        assert r["step_time_s"] > 0 and r["tflops"] == 6 * 24 * 8 * 200 / r["step_time_s"] / 1e12
        assert abs(r["loss_minus_reference"]) < 1e-5            # every cut computes the same loss
    assert "<- default" in capsys.readouterr().out


def test_peak_table_lookup():
    bench = load("train_throughput")
    assert bench.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert bench.peak_tflops("Tesla P100-PCIE-16GB", "float16") == 18.7
    assert bench.peak_tflops("Tesla T4", "bfloat16") is None
    assert bench.peak_tflops("CPU (x86_64, 2 threads)", "float32") is None


def test_short_train_runs_every_arm(prepared_run, tmp_path):
    summary = tmp_path / "short.json"
    assert load("short_train").main(["--data", str(prepared_run / "data"), "--run-dir", str(tmp_path / "run"),
                                     "--preset", "smoke", "--max-steps", "3", "--json", str(summary)]) == 0
    rows = json.loads(summary.read_text())
    assert set(rows) == {"gpt2", "dense_gqa", "moe_gqa"} and all(r["steps"] == 3 for r in rows.values())


@pytest.mark.slow
def test_gpu_check_prepares_what_travels_and_runs(tiny_corpus, tmp_path):
    """`prepare`, then `run` itself on this CPU at the smoke preset: a GPU loan is short, and a script
    that broke since the last one would waste it."""
    carry, out = tmp_path / "carry", tmp_path / "out"
    env = {**os.environ, "CARRY": str(carry), "CORPUS_DIR": str(tiny_corpus), "PYTHON": sys.executable}
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    r = subprocess.run(["bash", script, "prepare"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (carry / "run" / "data" / "meta.json").exists()
    assert len(list((carry / "tiktoken_cache").iterdir())) == 1
    # BUDGET: no stage skipped for time on a slow machine (the compile stage is gated on time left)
    env.update(DEVICE="cpu", PRESET="smoke", BATCHES="2 4", STEPS="1", TRAIN_STEPS="2", RUN_DIR=str(tmp_path / "run"),
               BUDGET="100000")
    r = subprocess.run(["bash", script, "run", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "gpu_check finished" in r.stdout and "skipped" not in r.stdout, r.stdout + r.stderr
    bench = json.loads((out / "bench.json").read_text())
    assert [(x["model"], x["batch_size"]) for x in bench["results"]] == [
        ("gpt2", 2), ("dense_gqa", 2), ("moe_gqa", 2), ("gpt2", 4), ("dense_gqa", 4), ("moe_gqa", 4)]
    assert [x["batch_size"] for x in json.loads((out / "bench_compile.json").read_text())["results"]] == [2, 2, 2]
    head = json.loads((out / "head_loss.json").read_text())
    assert (head["rows"], head["emb_dim"], head["vocab"]) == (4 * 32, 64, 50257)     # the smoke shape
    trained = json.loads((out / "short_train.json").read_text())
    assert {k: v["steps"] for k, v in trained.items()} == {"gpt2": 2, "dense_gqa": 2, "moe_gqa": 2}
    assert len(list(out.iterdir())) <= 9                   # what a device run can bring back
    assert subprocess.run(["bash", script], capture_output=True).returncode == 2


def test_rounds_alternate_the_order_and_pool_the_steps(monkeypatch, smoke_cfg):
    bench = load("train_throughput")
    calls = []

    def fake_time_steps(name, cfg, prec, batch_size, steps, warmup):
        calls.append(name)
        t = 1.0 if name == "gpt2" else 2.0
        return [t + 0.1 * len(calls)] * steps, 10.0 * len(calls), "fake_mb", {"flops_per_token": 1}

    monkeypatch.setattr(bench, "time_steps", fake_time_steps)
    prec = bench.resolve_precision("float32", bench.resolve_device("cpu"))
    res = bench.bench_batch(["gpt2", "moe_gqa"], smoke_cfg, prec, 2, steps=3, warmup=0, rounds=3)
    assert calls == ["gpt2", "moe_gqa", "moe_gqa", "gpt2", "gpt2", "moe_gqa"]
    gpt2, moe = res
    assert gpt2["timed_steps"] == moe["timed_steps"] == 9
    assert gpt2["step_time_s"] == 1.4 and moe["step_time_s"] == 2.3     # medians of the pooled rounds
    assert gpt2["peak_memory_mb"] == 10.0 and moe["peak_memory_mb"] == 20.0     # the least inflated round


def test_balancing_loss_compares_two_runs_that_differ_in_its_weight_alone(tmp_path, capsys):
    from llm_nb_utils.config import make_config
    def run(name, coef, losses, **changes):
        cfg = make_config("smoke", device="cpu", aux_loss_coef=coef, **changes)
        shares = [[0.25] * 4, [0.7, 0.1, 0.1, 0.1]] if coef == 0 else [[0.25] * 4, [0.3, 0.2, 0.25, 0.25]]
        m = {"config": cfg.to_dict(), "preset": "smoke", "steps": 30, "test_loss": sum(losses) / 3,
             "test_loss_ci": [0, 9], "test_window_losses": losses, "evaluation": {"test": {"description": "3 windows"}},
             "history": [{"step": s, "expert_share": shares} for s in (10, 20, 30)], "expert_utilisation": shares,
             "device_name": "CPU", "torch_version": "x"}
        (tmp_path / name / "metrics").mkdir(parents=True)
        (tmp_path / name / "metrics" / "moe_gqa.json").write_text(json.dumps(m))
        return str(tmp_path / name)
    on, off = run("on", 0.01, [5.0, 5.2, 5.4]), run("off", 0.0, [5.1, 5.3, 5.5])
    assert load("balancing_loss").main([on, off, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["without_loss"]["largest_share_per_layer"] == [0.25, 0.7]
    assert summary["with_loss"]["smallest_share_per_layer"] == [0.25, 0.2]
    assert abs(summary["test_loss_difference_without_minus_with"]["mean"] - 0.1) < 1e-9
    assert (tmp_path / "out" / "expert_shares.png").stat().st_size > 1000
    other = run("other", 0.0, [5.1, 5.3, 5.5], lr=1e-3)
    with pytest.raises(SystemExit, match="differ in aux_loss_coef alone .*lr"):
        load("balancing_loss").main([on, other, "--out", str(tmp_path / "out2")])
