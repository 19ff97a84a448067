"""The sweep: its statistics against hand computations, its plan, and a whole smoke sweep through
papermill, interrupted and continued from a folder holding only what a repository keeps."""
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from llm_nb_utils.config import ConfigError, make_config
from llm_nb_utils.env import REPO
from llm_nb_utils.stats import mean_ci, paired_difference
from llm_nb_utils import sweep, sweep_report

T_975_DF2 = 4.302653      # Student's t, 97.5% quantile, 2 degrees of freedom (any t table)
T_975_DF1 = 12.706205
T_95_DF2 = 2.919986       # 95% quantile, 2 degrees of freedom


# --- statistics --------------------------------------------------------------------------------------
def test_mean_ci_by_hand():
    # 1, 2, 3: mean 2, sample sd 1, standard error 1/sqrt(3)
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(T_975_DF2 / math.sqrt(3), rel=1e-6)
    # two values 4 and 6: mean 5, sd sqrt(2), se 1
    assert mean_ci([4.0, 6.0]) == pytest.approx((5.0, T_975_DF1), rel=1e-6)
    assert math.isnan(mean_ci([3.5])[1])
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_t_test_by_hand():
    # differences m + (-1, 0, 1): sd 1, se 1/sqrt(3); with m = 4.302653/sqrt(3), t is the 97.5% quantile
    # of t(2), so the two-sided p is 0.05 and the 95% interval's lower end is exactly 0
    m = T_975_DF2 / math.sqrt(3)
    a = [10.0, 20.0, 30.0]
    b = [x + m + e for x, e in zip(a, (-1.0, 0.0, 1.0))]
    d = paired_difference(a, b)
    assert d.n == 3 and d.mean == pytest.approx(m)
    assert d.t == pytest.approx(T_975_DF2, rel=1e-6)
    assert d.p == pytest.approx(0.05, rel=1e-4)
    assert d.ci_low == pytest.approx(0.0, abs=1e-6) and d.ci_high == pytest.approx(2 * m, rel=1e-6)
    # t at the 95% quantile: p = 0.10, and the interval covers zero
    m = T_95_DF2 / math.sqrt(3)
    d = paired_difference(a, [x + m + e for x, e in zip(a, (-1.0, 0.0, 1.0))])
    assert d.p == pytest.approx(0.10, rel=1e-4) and d.covers_zero
    # the sign: b lower than a gives a negative difference
    assert paired_difference([3.0, 3.1, 3.2], [2.9, 2.95, 3.1]).mean == pytest.approx(-0.1166667, rel=1e-5)


def test_paired_difference_edge_cases():
    one = paired_difference([3.0], [2.9])
    assert one.n == 1 and one.mean == pytest.approx(-0.1) and math.isnan(one.p) and one.covers_zero
    same = paired_difference([1.0, 2.0], [1.5, 2.5])          # identical differences: no spread
    assert same.mean == pytest.approx(0.5) and same.p == 0.0 and not same.covers_zero
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference([1.0, 2.0], [1.0])


# --- the plan ------------------------------------------------------------------------------------------
def test_grids_name_every_point_and_keep_active_work_constant():
    cfg = make_config("small", device="cpu")
    pts = sweep.grid_points(cfg, "seeds", [1, 2])
    assert [p.name for p in pts] == ["gpt2-seed1", "dense_gqa-seed1", "moe_gqa-e4k2-w512-seed1",
                                     "gpt2-seed2", "dense_gqa-seed2", "moe_gqa-e4k2-w512-seed2"]
    assert [p.design for p in pts[:3]] == ["GPT-2", "Dense-GQA", "MoE-GQA 4x2 (512)"]
    two = sweep.grid_points(cfg, "seeds", [1], arms="moe_gqa,gpt2")
    assert [p.model for p in two] == ["gpt2", "moe_gqa"]                     # the registry's order
    iso = sweep.grid_points(cfg, "seeds", [1], dense_iso_total=True)
    assert [p.name for p in iso] == ["gpt2-seed1", "dense_gqa-seed1", "dense_gqa-w2048-seed1", "moe_gqa-e4k2-w512-seed1"]
    assert iso[2].overrides() == {"dense_ff_width": 2048} and iso[2].design == "Dense-GQA (width 2048)"
    with pytest.raises(ConfigError, match="unknown arm 'mamba'; the arms are gpt2, dense_gqa, moe_gqa"):
        sweep.grid_points(cfg, "seeds", [1], arms="gpt2,mamba")
    moe = sweep.grid_points(cfg, "moe", [7], experts=(2, 4, 8), per_token=(1, 2), keep_active=True)
    assert len(moe) == 2 + 6 and [p.model for p in moe[:2]] == ["gpt2", "dense_gqa"]
    assert {(p.num_experts_per_token, p.moe_intermediate_size) for p in moe[2:]} == {(1, 1024), (2, 512)}
    assert sweep.grid_points(cfg, "moe", [7], (2, 4), (1,))[2].moe_intermediate_size == 512
    with pytest.raises(ConfigError, match="2 experts x 4 per token"):
        sweep.grid_points(cfg, "moe", [7], (2,), (4,))
    with pytest.raises(ConfigError, match="not divisible by 3"):
        sweep.grid_points(cfg, "moe", [7], (4,), (3,), keep_active=True)
    with pytest.raises(ConfigError, match="grid must be"):
        sweep.grid_points(cfg, "experts", [7])


def test_budget_in_steps_or_tokens_and_paper_needs_one():
    cfg = make_config("small", device="cpu")              # 8 x 128 = 1,024 tokens per step
    assert sweep.budget_steps(cfg) == 300
    assert sweep.budget_steps(cfg, tokens=10_000) == 10   # whole steps, rounded up
    with pytest.raises(ConfigError, match="needs a budget"):
        sweep.budget_steps(make_config("paper", device="cpu"))


def test_a_folder_keeps_one_budget(tmp_path):
    cfg = make_config("smoke", device="cpu", max_steps=10)
    sweep.plan(cfg, tmp_path, "seeds", seeds=2, log=lambda *_: None)
    sweep.plan(cfg, tmp_path, "seeds", seeds=3, log=lambda *_: None)      # more seeds: fine
    with pytest.raises(ConfigError, match="budget 10 steps.*now 20 steps"):
        sweep.plan(cfg.replace(max_steps=20), tmp_path, "seeds", seeds=2)
    with pytest.raises(ConfigError, match="lr"):
        sweep.plan(cfg.replace(lr=1e-3), tmp_path, "seeds", seeds=2)


def test_a_sweep_is_read_back_from_its_folder_alone(tmp_path):
    from llm_nb_utils.files import write_json
    cfg = make_config("smoke", device="cpu", max_steps=10, lr=2e-3)
    planned = sweep.plan(cfg, tmp_path, "moe", seeds=2, experts=(2, 4), per_token=(1,), log=lambda *_: None)
    for p in reversed(planned.points[:5]):          # five finished, written in another order than planned
        metrics = sweep.RunFolder(planned.run_dir(p)).metrics_path(p.model)
        metrics.parent.mkdir(parents=True)
        write_json(metrics, {"steps": 10, "config": planned.point_config(p).to_dict()})
        write_json(metrics.with_name(f"{p.model}_samples.json"), {"samples": []})     # generations: not a point
    stray = tmp_path / "runs" / "old-name" / "metrics" / "gpt2.json"                  # not a folder this sweep named
    stray.parent.mkdir(parents=True)
    write_json(stray, {"steps": 10, "config": planned.point_config(planned.points[0]).to_dict()})
    loaded = sweep.load(tmp_path, log=lambda *_: None)
    assert [p.name for p in loaded.points] == [p.name for p in planned.points[:5]]      # the plan's order
    assert loaded.steps == 10 and loaded.cfg.lr == 2e-3 and loaded.cfg.preset == "smoke"
    assert all(loaded.finished(p) for p in loaded.points)
    with pytest.raises(ConfigError, match=r"holds no sweep \(no sweep.json\)\. Fix: give the --out folder"):
        sweep.load(tmp_path / "runs")


def test_the_estimate_counts_what_is_left_and_warns_past_the_limit(tmp_path):
    cfg = make_config("smoke", device="cpu", max_steps=10)     # eval every 10 steps on 2 batches; 128 test windows
    lines = []
    sw = sweep.plan(cfg, tmp_path, "seeds", seeds=2, log=lines.append)
    sw.step_s = {"GPT-2": 1.0, "Dense-GQA": 1.5, "MoE-GQA 4x2 (128)": 2.0}         # as if measured
    # per run: 10 steps + (2 evaluations x 2 splits x 2 batches + 128 / 4 test batches) / 3 = 23.33 step-times
    assert sw.estimate(max_hours=1.0) == pytest.approx(2 * (1.0 + 1.5 + 2.0) * (10 + 40 / 3))
    assert not any("warning" in l for l in lines)
    sw.estimate(max_hours=0.01)
    assert "exceed max_hours=0.01" in lines[-1]
    # every estimate is kept: once all is done, the report still shows what was planned
    sw.finished = lambda p: {"steps": 10}
    lines.clear()
    assert sw.estimate() == 0.0
    assert lines[0].endswith("6 done, 0 to run") and len(lines) == 3
    assert " on CPU" in lines[1] and "), 6 to run: 3 min 30 s (GPT-2 1.000 s/step, Dense-GQA 1.500 s/step, MoE-GQA 4x2 (128) 2.000 s/step)" in lines[1]


# --- the report ----------------------------------------------------------------------------------------
def fake_runs(gpt2, moe, dense=None):
    rows = []
    arms = (("gpt2", "GPT-2", gpt2), ("moe_gqa", "MoE-GQA 4x2 (512)", moe))
    if dense is not None:
        arms += (("dense_gqa", "Dense-GQA", dense),)
    for model, design, losses in arms:
        for seed, loss in zip((1, 2, 3), losses):
            rows.append(dict(run=f"{model}-{seed}", model=model, design=design, seed=seed, test_loss=loss,
                             test_perplexity=math.exp(loss), test_bits_per_byte=loss / 3, tokens_per_s=1000.0,
                             peak_memory_mb=500.0, total_params=100, active_params=80, flops_per_token=6e8,
                             training_flops=6e14, test_fingerprint="same windows"))
    return pd.DataFrame(rows)


def test_the_conclusion_follows_the_interval():
    clear = fake_runs([5.0, 5.1, 5.2], [4.9, 4.95, 5.1])          # differences -0.1, -0.15, -0.1
    text = sweep_report.conclusion(clear, 300, 307_200)
    assert "**lower**" in text and "excludes zero" in text and "300 steps (307,200 tokens)" in text
    noisy = fake_runs([5.0, 5.1, 5.2], [5.1, 4.9, 5.2])           # +0.1, -0.2, 0
    text = sweep_report.conclusion(noisy, 300, 307_200)
    assert "**not distinguishable**" in text and "covers zero" in text
    steady = fake_runs([5.0, 5.1, 5.2], [4.7, 4.801, 4.9])        # -0.3, -0.299, -0.3: t about -900
    text = sweep_report.conclusion(steady, 300, 307_200)
    assert "p < 0.001" in text and "0.000" not in text
    assert sweep_report.differences_table(sweep_report.differences(steady), steady)["p-value"].iloc[0] == "< 0.001"
    table = sweep_report.design_table(clear)
    mean, half = mean_ci([5.0, 5.1, 5.2])
    assert table.loc["GPT-2", "Test loss"] == f"{mean:.4f} ± {half:.4f}"
    diffs = sweep_report.differences_table(sweep_report.differences(clear), clear)
    assert diffs.loc["MoE-GQA 4x2 (512) − GPT-2", "Difference"] == "-0.1167"


def test_the_decomposition_pairs_each_step_by_seed():
    runs = fake_runs([5.0, 5.1, 5.2], [4.9, 4.95, 5.1], dense=[4.95, 5.0, 5.1])
    steps = {(a, b): (what, d) for a, b, what, d in sweep_report.decomposition(runs)}
    arch, experts, both = (steps[k] for k in (("GPT-2", "Dense-GQA"), ("Dense-GQA", "MoE-GQA 4x2 (512)"),
                                                ("GPT-2", "MoE-GQA 4x2 (512)")))
    assert arch[0] == "the architecture" and arch[1].mean == pytest.approx(-0.25 / 3)
    assert experts[0] == "the experts" and experts[1].mean == pytest.approx(-0.1 / 3)
    assert both[1].mean == pytest.approx(arch[1].mean + experts[1].mean)      # the two steps add up
    table = sweep_report.decomposition_table(sweep_report.decomposition(runs), runs)
    assert table.loc["MoE-GQA 4x2 (512) − Dense-GQA", "What changes"] == "the experts"
    text = sweep_report.conclusion(runs, 300, 307_200)
    assert "The step from Dense-GQA to MoE-GQA 4x2 (512) changes the experts only" in text
    assert text.count("Dense-GQA reaches") + text.count("Dense-GQA is **") == 1   # the architecture's step said once
    assert "The step from GPT-2 to Dense-GQA changes the architecture only: Dense-GQA " in text
    assert "3 seeds per design" in text


def test_throughput_that_varies_within_a_design_is_flagged():
    steady = fake_runs([5.0, 5.1, 5.2], [4.9, 4.95, 5.1])                  # 1,000 tokens/s everywhere
    assert sweep_report.throughput_caution(steady) == ""
    shared = steady.assign(tokens_per_s=[1000.0, 1050.0, 600.0, 900.0, 950.0, 1000.0])
    text = sweep_report.throughput_caution(shared)                         # GPT-2: (1050 - 600) / 883.3 = 51%
    assert text.startswith("**Tokens/s is not a speed comparison here.**") and "up to 51% apart in speed (GPT-2)" in text
    assert sweep_report.throughput_caution(fake_runs([5.0], [4.9])) == ""  # one run per design: nothing to compare


def test_within_a_seed_each_design_pairs_with_the_dense_one_window_by_window():
    runs = fake_runs([5.0], [4.9], dense=[4.95])
    losses = {"gpt2-1": [5.0, 5.2, 4.8, 5.0], "dense_gqa-1": [5.0, 5.1, 4.9, 4.8], "moe_gqa-1": [4.9, 5.0, 4.8, 4.9]}
    table = sweep_report.window_differences(runs, losses)
    # by hand: MoE - Dense = -0.1, -0.1, -0.1, +0.1: mean -0.05, sd 0.1, se 0.05, t(0.975, 3) = 3.182446
    moe = table.loc[("MoE-GQA 4x2 (512) − Dense-GQA", 1)]
    assert moe["Difference"] == "-0.0500" and moe["95% CI over windows"] == "[-0.2091, +0.1091]"
    assert moe["Relative"] == f"{-0.05 / 4.95 * 100:+.2f}%" and moe["Beyond the test sample's noise"] == "no"
    # Dense - GPT-2 (the architecture's step, the decomposition's sign) = 0, -0.1, +0.1, -0.2:
    # mean -0.05, sd 0.1291, half-width 0.2054, relative to GPT-2's mean 5.0
    arch = table.loc[("Dense-GQA − GPT-2", 1)]
    assert arch["95% CI over windows"] == "[-0.2554, +0.1554]" and arch["Relative"] == "-1.00%"
    clear = {**losses, "moe_gqa-1": [4.9, 4.98, 4.82, 4.7]}                  # -0.1, -0.12, -0.08, -0.1
    row = sweep_report.window_differences(runs, clear).loc[("MoE-GQA 4x2 (512) − Dense-GQA", 1)]
    assert row["95% CI over windows"] == "[-0.1260, -0.0740]" and row["Beyond the test sample's noise"] == "yes"
    other = runs.assign(test_fingerprint=["a", "b", "a"])                   # MoE's windows were other windows
    assert list(sweep_report.window_differences(other, losses).index) == [("Dense-GQA − GPT-2", 1)]
    text = sweep_report.lowest_design(runs, losses)                         # one seed: what the windows say
    assert "fewer than two shared seeds, nothing says whether that order is more than luck of training" in text
    assert "over the test windows of seed 1, Dense-GQA − MoE-GQA 4x2 (512) = +0.0500 [-0.1091, +0.2091]" in text
    assert sweep_report.dense_reference(fake_runs([5.0], [4.9])) == "GPT-2"  # no Dense-GQA in the sweep


def test_a_one_seed_gap_is_set_against_another_sweeps_seed_spread():
    seeds = fake_runs([5.0, 5.1, 5.2], [4.8, 4.95, 5.0], dense=[4.9, 5.0, 5.05])
    spreads = sweep_report.seed_spreads(seeds)
    # by hand: Dense - GPT-2 = -0.1, -0.1, -0.15 (sd 0.028868); MoE - Dense = -0.1, -0.05, -0.05 (sd 0.028868)
    arch, experts = spreads[("GPT-2", "Dense-GQA")], spreads[("Dense-GQA", "MoE-GQA 4x2 (512)")]
    assert arch.differences == pytest.approx([-0.1, -0.1, -0.15]) and arch.sd == pytest.approx(0.0288675, rel=1e-5)
    assert experts.differences == pytest.approx([-0.1, -0.05, -0.05]) and experts.what == "the experts"
    assert str(experts) == "MoE-GQA 4x2 (512) − Dense-GQA: -0.1000, -0.0500, -0.0500 over 3 seeds, standard deviation 0.0289"
    assert sweep_report.seed_spreads(fake_runs([5.0], [4.9], dense=[4.95])) == {}    # one seed: no spread
    assert "no step of the decomposition with two seeds" in sweep_report.spread_note({}, "sweep-x", 300)
    assert sweep_report.spread_note(spreads, "sweep-x", 2000).startswith("Seed spread, from the sweep `sweep-x` (2,000 steps per run): Dense-GQA − GPT-2: -0.1000")

    one = fake_runs([5.0], [4.9], dense=[4.95])             # a one-seed grid: the study's design and another
    other = one[one["model"] == "moe_gqa"].assign(design="MoE-GQA 8x1 (1024)", run="moe_gqa-8x1-1")
    grid = pd.concat([one, other], ignore_index=True)
    losses = {"gpt2-1": [5.0, 5.2, 4.8, 5.0], "dense_gqa-1": [5.0, 5.1, 4.9, 4.8],
              "moe_gqa-1": [4.98, 5.08, 4.88, 4.78],          # -0.02 each: within the spread
              "moe_gqa-8x1-1": [4.95, 5.05, 4.85, 4.75]}      # -0.05 each: beyond it
    table = sweep_report.window_differences(grid, losses, spreads)
    assert table.loc[("MoE-GQA 4x2 (512) − Dense-GQA", 1), "Beyond the seed spread"] == "no (SD 0.0289)"
    assert table.loc[("MoE-GQA 8x1 (1024) − Dense-GQA", 1), "Beyond the seed spread"] == "yes (SD 0.0289)"  # the experts' step
    assert table.loc[("Dense-GQA − GPT-2", 1), "Beyond the seed spread"] == "yes (SD 0.0289)"   # -0.05 vs its own step
    only_experts = {k: v for k, v in spreads.items() if v.what == "the experts"}
    assert sweep_report.window_differences(grid, losses, only_experts).loc[
        ("Dense-GQA − GPT-2", 1), "Beyond the seed spread"] == "not measured"
    assert "Beyond the seed spread" not in sweep_report.window_differences(grid, losses).columns
    text = sweep_report.within_seed_reading(grid, losses, spreads)       # lowest first, what each gap clears
    assert text.startswith("**Seed 1 alone, each design with experts against Dense-GQA** over the same 4 test windows")
    assert ("MoE-GQA 8x1 (1024) -0.0500 (-1.01%) [-0.0500, -0.0500], beyond the test sample's noise and beyond the "
            "seed spread (SD 0.0289); MoE-GQA 4x2 (512) -0.0200 (-0.40%) [-0.0200, -0.0200], beyond the test "
            "sample's noise and within the seed spread (SD 0.0289).") in text
    assert "no design is called better than another" in text
    one_seed = sweep_report.conclusion(grid, 10, 100)
    assert "here the design with the lowest mean loss, MoE-GQA 4x2 (512), is at" in one_seed
    assert ("Against GPT-2, on the one seed pair trained: MoE-GQA 4x2 (512) -0.1000, Dense-GQA -0.0500, MoE-GQA 8x1 "
            "(1024) -0.1000. One pair cannot say whether a difference is more than luck") in one_seed
    assert one_seed.count("more than luck") == 1                          # once, not once per design
    noisy = {**losses, "moe_gqa-1": [5.1, 5.0, 4.9, 4.7]}                # +0.1, -0.1, 0, -0.1: covers zero
    assert "MoE-GQA 4x2 (512) -0.0250 (-0.51%) [-0.1773, +0.1273], within the test sample's noise." in \
        sweep_report.within_seed_reading(grid, noisy)
    assert sweep_report.within_seed_reading(seeds, {}) == ""              # several seeds: the seed tables answer


# --- a whole sweep -------------------------------------------------------------------------------------
def sweep_cmd(corpus, out):
    return [sys.executable, "-m", "llm_nb_utils.sweep", "--preset", "smoke", "--grid", "moe", "--experts", "2", "4",
            "--per-token", "1", "--seeds", "2", "--max-steps", "10", "--arms", "gpt2", "moe_gqa", "--corpus-dir", str(corpus),
            "--out", str(out), "--set", "device=cpu"]


def keep_only_what_a_repository_holds(out):
    """What a fresh clone of a published sweep folder has (see docs/sweep-*/.gitignore): each point's
    metrics, executed notebook and logs; no prepared data, no checkpoints."""
    for path in [out / "data", *out.glob("runs/*/data"), *out.glob("runs/*/checkpoints"),
                 *out.glob("runs/*/wandb"), *out.glob("runs/*/figures"), *out.glob("runs/*/hf")]:
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)


@pytest.mark.slow
def test_a_smoke_sweep_interrupted_and_continued_through_papermill(tiny_corpus, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(sweep_cmd(tiny_corpus, out), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=False)
    first = out / "runs" / "gpt2-seed123" / "metrics" / "gpt2.json"
    second = out / "runs" / "moe_gqa-e2k1-w128-seed123" / "metrics" / "moe_gqa.json"
    deadline = time.time() + 400
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert second.exists(), "two points should have finished"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "to continue where it stopped: python -m llm_nb_utils.sweep" in stderr
    finished_at = {p: p.stat().st_mtime_ns for p in (first, second)}
    keep_only_what_a_repository_holds(out)
    assert not list(out.glob("runs/*/checkpoints")) and not (out / "data").exists()

    wrong = subprocess.run([*sweep_cmd(tiny_corpus, out), "--seed-spread-from", str(tmp_path / "nowhere")], cwd=REPO,
                           env=env, text=True, capture_output=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.strip().endswith("holds no sweep (no sweep.json). Fix: give the --out "
                                                                   "folder of a sweep (python -m llm_nb_utils.sweep), "
                                                                   "e.g. docs/sweep-arms-small-2000.")
    # continued, its one-seed gaps read against a sweep with seeds (itself: GPT-2 and MoE-GQA only, no step to measure)
    again = subprocess.run([*sweep_cmd(tiny_corpus, out), "--seed-spread-from", str(out)], cwd=REPO, env=env, text=True,
                           capture_output=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1/6 gpt2-seed123: done earlier, skipped" in again.stdout
    assert "2/6 moe_gqa-e2k1-w128-seed123: done earlier, skipped" in again.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in finished_at.items())      # not trained again
    assert len(list(out.glob("runs/gpt2-*/metrics/gpt2.json")) + list(out.glob("runs/moe*/metrics/moe_gqa.json"))) == 6
    assert len(list(out.glob("runs/*/notebooks/0[24]_*.ipynb"))) == 6             # a notebook per run

    html = (out / "reports" / "06_sweep.html").read_text()
    assert "Conclusion" in html and "seeds per design" in html and "Paired t" in html
    assert "95% CI over windows" in html and "MoE-GQA 2x1 (128) − GPT-2" in html      # within a seed
    assert "has no step of the decomposition with two seeds or more" in html         # --seed-spread-from
    assert "last word (exact match) (0%)" in html          # the pack over seeds (the tiny corpus has no agreement items)
    for stray in ("PosixPath(", "<Figure size", "IPython.core.display", "object at 0x", ">NaN<", ">nan<",
                  "No description has been provided for this image", str(out)):
        assert stray not in html, stray
    images = re.findall(r"<img [^>]*>", html)
    assert len(images) == 2 and all('alt="' in i for i in images)


def test_the_lowest_design_is_named_with_what_the_seeds_say():
    clear = fake_runs([5.0, 5.1, 5.2], [4.9, 4.95, 5.1])           # MoE lower in every seed pair
    text = sweep_report.lowest_design(clear)
    assert text.startswith("Lowest mean test loss: MoE-GQA 4x2 (512) (4.9833), then GPT-2 (5.1000)")
    assert "exceeds the seeds' noise (GPT-2 − MoE-GQA 4x2 (512) = +0.1167" in text
    noisy = sweep_report.lowest_design(fake_runs([5.0, 5.1, 5.2], [5.1, 4.9, 5.15]))
    assert "the seeds cannot tell the two apart" in noisy
    one = sweep_report.lowest_design(fake_runs([5.0], [4.9]))
    assert "fewer than two shared seeds" in one


def test_the_evaluation_pack_is_read_over_seeds_and_paired_like_the_loss():
    runs = fake_runs([5.0, 5.1, 5.2], [4.9, 4.95, 5.1], dense=[4.95, 5.0, 5.1])
    assert sweep_report.language_table(runs).empty                          # runs without the pack: no table
    acc = {"GPT-2": [80.0, 82.0, 84.0], "Dense-GQA": [90.0, 91.0, 95.0], "MoE-GQA 4x2 (512)": [90.0, 92.0, 94.0]}
    runs["lang_gender"] = [acc[d][s - 1] for d, s in zip(runs["design"], runs["seed"])]
    for col in ("lang_number", "lang_last_word", "language_score"):
        runs[col] = 50.0
    table = sweep_report.language_table(runs)
    gender = table.loc["gender agreement (50%)"]
    mean, half = mean_ci([80.0, 82.0, 84.0])
    assert gender["GPT-2"] == f"{mean:.1f} ± {half:.1f}"
    # Dense - GPT-2 per seed: +10, +9, +11: mean +10, sd 1, half-width 4.303 / sqrt(3) = 2.484
    assert gender["Dense-GQA − GPT-2"] == "+10.0 [+7.5, +12.5]"
    assert gender["MoE-GQA 4x2 (512) − Dense-GQA"] == "+0.0 [-2.5, +2.5]"   # 0, +1, -1: sd 1 as well
    runs.loc[0, "lang_number"] = float("nan")                 # one run without this task: the task is left out
    assert "number agreement (50%)" not in sweep_report.language_table(runs).index
    assert "gender agreement (50%)" in sweep_report.language_table(runs).index
