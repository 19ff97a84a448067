"""The four notebooks end to end through papermill and nbconvert, on the smoke preset."""
import ast
import json
import math
import re
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

from llm_nb_utils.arms import ARM_NAMES
from llm_nb_utils.pipeline import NOTEBOOKS, main
from llm_nb_utils.env import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_proc(tiny_corpus, tmp_path_factory):
    """The pipeline as a user starts it, in a process of its own: (run directory, what it printed)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    proc = subprocess.run([sys.executable, "-m", "llm_nb_utils.pipeline", "--preset", "smoke", "--corpus-dir",
                           str(tiny_corpus), "--out", str(out), "--set", "device=cpu", "--export-hf"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.fixture(scope="module")
def pipeline_run(pipeline_proc):
    return pipeline_proc[0]


def test_the_terminal_shows_the_notebooks_not_papermill_the_kernel_or_asyncio(pipeline_proc):
    _, proc = pipeline_proc
    printed = proc.stdout + proc.stderr
    for noise in ["Executing Cell", "Unable to parse", "Passed unknown parameter", "IPKernelApp", "asyncio",
                  "without encryption", "Traceback", "TqdmWarning", "Black is not installed"]:
        assert noise not in printed, noise
    for name in NOTEBOOKS:
        assert f"[pipeline] {name}: running" in proc.stdout and f"[pipeline] {name}: done in" in proc.stdout
    for name in ARM_NAMES:
        assert f"{name}: test loss" in proc.stdout                            # what the notebooks print
    assert "[pipeline] training 30 steps per arm, estimated from 3 timed steps each: gpt2 ~" in proc.stdout
    assert "without encryption" in (pipeline_proc[0] / "logs" / "02_gpt2_baseline.kernel.log").read_text()


@pytest.fixture(scope="module")
def run_metrics(pipeline_run):
    return {n: json.loads((pipeline_run / "metrics" / f"{n}.json").read_text()) for n in ARM_NAMES}


def test_table1_describes_the_windows_actually_used(pipeline_run):
    t1 = pd.read_csv(pipeline_run / "table1.csv", index_col=0)
    assert list(t1.columns) == ["train", "validation", "test"]
    assert list(t1.index) == ["words", "samples", "tokens_per_sample", "batch_size", "batches", "words: (top level)"]
    assert (t1.loc["words: (top level)"] == t1.loc["words"]).all()      # one collection: all the words
    assert (t1.loc["tokens_per_sample"] == 32).all() and (t1.loc["batch_size"] == 4).all()
    assert t1.loc["batches", "train"] == t1.loc["samples", "train"] // 4       # full batches only
    meta = json.loads((pipeline_run / "data" / "meta.json").read_text())
    assert t1.loc["words", "train"] == meta["splits"]["train"]["words"]


def test_both_runs_took_the_steps_the_preset_asks_for(run_metrics):
    for m in run_metrics.values():
        assert m["steps"] == 30 and m["tokens_seen"] == 30 * 4 * 32          # smoke: 30 steps of 4 x 32
        assert m["test_perplexity"] == pytest.approx(math.exp(m["test_loss"]))
        assert [h["step"] for h in m["history"]] == [10, 20, 30]


def test_table2_columns_are_the_metrics_files_and_variation_is_signed(pipeline_run, run_metrics):
    t2 = pd.read_csv(pipeline_run / "table2.csv", index_col=0)
    steps = [("gpt2", "dense_gqa"), ("dense_gqa", "moe_gqa"), ("gpt2", "moe_gqa")]   # architecture, experts, both
    assert list(t2.columns) == [*ARM_NAMES, *(f"{b}_vs_{a}_{s}" for a, b in steps for s in ("pct", "ci_low", "ci_high"))]
    rows = ["test_loss", "test_perplexity", "train_time_s", "peak_memory_mb", "tokens_per_s", "test_bits_per_byte",
            "total_params", "active_params", "flops_per_token", "tokens_seen", "test_windows", "test_tokens_evaluated",
            "rss_before_model_mb", "memory_added_mb"]                       # the last two: a CPU run's
    assert [r for r in t2.drop(index="test_loss_ci95").index if not r.startswith("lang_")] == rows
    assert t2.loc["test_windows", "gpt2"] == 128 and t2.loc["test_tokens_evaluated", "gpt2"] == 128 * 32
    for a, b in steps:
        col = f"{b}_vs_{a}"
        for row in ("test_loss", "test_perplexity", "test_bits_per_byte"):    # the paired interval holds the point
            assert t2.loc[row, f"{col}_ci_low"] < t2.loc[row, f"{col}_pct"] < t2.loc[row, f"{col}_ci_high"], (col, row)
        for row in rows:
            va, vb = run_metrics[a][row], run_metrics[b][row]
            assert (t2.loc[row, a], t2.loc[row, b]) == (pytest.approx(va), pytest.approx(vb)), row
            assert t2.loc[row, f"{col}_pct"] == pytest.approx((vb - va) / va * 100), (col, row)
    for name in ARM_NAMES:
        low, high = run_metrics[name]["test_loss_ci"]
        assert t2.loc["test_loss_ci95", name] == pytest.approx((high - low) / 2)
    dense, moe = run_metrics["dense_gqa"], run_metrics["moe_gqa"]
    assert moe["active_params"] - dense["active_params"] == 2 * 64 * 4      # the routers: layers x width x experts


def test_the_test_loss_agrees_with_an_independent_sample_spread_over_the_split(pipeline_run, run_metrics):
    """Another seeded sample of test windows, read from the final checkpoints, gives the same test loss
    within the two samples' intervals: the reported figure stands for the split, not for one passage."""
    import numpy as np
    import torch
    from llm_nb_utils import evaluation as ev
    from llm_nb_utils.config import Config
    from llm_nb_utils.data import load_splits
    from llm_nb_utils.device import resolve_precision
    from llm_nb_utils.runfolder import RunFolder
    for name, m in run_metrics.items():
        cfg = Config(**{**m["config"], "eval_seed": m["config"]["eval_seed"] + 1})
        model = RunFolder(pipeline_run).load_trained_model(name, cfg)
        ds = load_splits(pipeline_run / "data", cfg)["test"].dataset
        sample = ev.test_sample(len(ds), cfg)
        assert sample.fingerprint() != m["evaluation"]["test"]["fingerprint"]
        other = ev.estimate(ev.window_losses(model, ds, sample, cfg.batch_size,
                                             resolve_precision("float32", torch.device("cpu"))))
        ours = ev.estimate(m["test_window_losses"])
        assert ours.mean == pytest.approx(m["test_loss"], abs=1e-6) and ours.n == m["test_windows"] == 128
        assert abs(other.mean - ours.mean) < 1.96 * np.hypot(other.se, ours.se), name


def test_the_report_shows_the_computed_numbers(pipeline_run, run_metrics):
    report = (pipeline_run / "reports" / "05_compare_and_report.html").read_text()
    g, m = run_metrics["gpt2"], run_metrics["moe_gqa"]
    for text in [f"{g['test_loss']:.4f}", f"{m['test_loss']:.4f}", f"{g['test_perplexity']:.2f}",
                 f"{(m['test_loss'] - g['test_loss']) / g['test_loss'] * 100:+.2f}% [", "Dense-GQA vs GPT-2 baseline",
                 "MoE-GQA vs Dense-GQA", "(the experts)", "(the architecture)", "Qwen3ForCausalLM: 'lisboa",
                 "128 of ", "windows (4,096 tokens", "paired 95% interval", "alternating rounds",
                 f"{m['tokens_per_s']:,.0f}", "NVIDIA Tesla P100", "Discussion", "smoke",
                 "GPT2LMHeadModel: 'lisboa", "Qwen3MoeForCausalLM: 'lisboa"]:
        assert text in report, text
    assert f"GPT-2 baseline → MoE-GQA (both steps: the study's comparison): test loss {g['test_loss']:.4f}" in report
    assert "only 30 training steps" in report                  # the caution beside the numbers
    assert report.count("data:image/png;base64") >= 2          # loss curves + expert utilisation


def test_every_report_renders_cleanly(pipeline_run):
    for name in NOTEBOOKS:
        html = (pipeline_run / "reports" / f"{name}.html").read_text()
        assert "data:image/png;base64" in html and "<table" in html, name
        assert "Traceback" not in html and "wandb:" not in html.lower(), name


# What a reader of a report should never meet: reprs of Python objects, the metrics files' raw keys,
# missing values, and figures without alt text (nbconvert's placeholder for it).
STRAY = ["PosixPath(", "<Figure size", "Styler at 0x", "IPython.core.display", "object at 0x",
         "process_peak_rss_mb", "cuda_max_memory_allocated_mb", "tokens_per_sample", "test_perplexity",
         ">NaN<", ">nan<", "No description has been provided for this image",
         "{&#39;", "{&#x27;", "{'"]                                   # a dict's repr in an output


def test_reports_have_no_stray_reprs_raw_keys_or_images_without_alt_text(pipeline_run):
    for name in NOTEBOOKS:
        html = (pipeline_run / "reports" / f"{name}.html").read_text()
        for stray in STRAY:
            assert stray not in html, (name, stray)
        images = re.findall(r"<img [^>]*>", html)
        assert images, name
        for img in images:
            alt = re.search(r'alt="([^"]*)"', img)
            assert alt and len(alt.group(1)) > 10, (name, img[:80])
        assert str(pipeline_run) not in html, name                   # no absolute local paths
        assert "injected-parameters" not in html and "package_source" not in html, name


def test_exports_and_figures_are_written(pipeline_run):
    for name in ARM_NAMES:
        hf = pipeline_run / "hf" / name
        assert (hf / "model.safetensors").stat().st_size > 1000 and (hf / "merges.txt").exists()
    for fig in ["loss_curves.png", "gpt2_loss.png", "dense_gqa_loss.png", "moe_gqa_loss.png", "moe_expert_utilisation.png",
                "document_lengths.png"]:
        assert (pipeline_run / "figures" / fig).stat().st_size > 1000, fig
    assert not [p for p in pipeline_run.rglob(".*.tmp") if "wandb" not in p.parts]   # every atomic write completed


def test_executed_notebooks_do_not_record_where_the_package_sits(pipeline_run):
    """papermill writes the notebook's absolute input path; the kept notebook names it from the
    repository, as a notebook published in docs/ must."""
    for name in NOTEBOOKS:
        text = (pipeline_run / "notebooks" / f"{name}.ipynb").read_text()
        assert f"{REPO}/" not in text and '"input_path": "notebooks/' in text, name


def test_rerun_reuses_finished_work(pipeline_run, tiny_corpus):
    assert main(["--preset", "smoke", "--corpus-dir", str(tiny_corpus), "--out", str(pipeline_run),
                 "--set", "device=cpu", "--only", "01_data_prep", "02_gpt2_baseline", "--no-html"]) == 0
    texts = {}
    for name in ("01_data_prep", "02_gpt2_baseline"):
        nb = nbformat.read(pipeline_run / "notebooks" / f"{name}.ipynb", as_version=4)
        texts[name] = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "reusing prepared data" in texts["01_data_prep"]
    assert "already trained" in texts["02_gpt2_baseline"]


def test_a_failing_notebook_is_named_with_its_cell_and_error(tmp_path, capsys):
    code = main(["--preset", "smoke", "--corpus-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"),
                 "--no-html"])
    err = capsys.readouterr().err
    assert code == 1
    assert "notebook 01_data_prep failed in cell" in err and "CorpusError" in err and "does not exist" in err
    assert str(tmp_path / "run" / "notebooks" / "01_data_prep.ipynb") in err


def test_bad_settings_fail_before_any_work(tmp_path, capsys):
    assert main(["--preset", "smoke", "--out", str(tmp_path / "run"), "--set", "n_kv_groups=3"]) == 2
    assert "divisible by n_kv_groups" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["--preset", "smoke", "--out", str(tmp_path / "run"), "--arms", "moe_gqa"]) == 2
    assert "needs at least two arms" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_notebooks_are_committed_clean_and_share_their_parameters():
    names = None
    for name in (*NOTEBOOKS, "06_sweep"):
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, name
        assigned = {n.target.id for n in ast.parse(params[0].source).body}
        names = names or assigned
        assert assigned == names or (name == "06_sweep" and assigned > names), name   # 05 adds the sweep's
        logic = [c for c in code if c not in params and "bootstrap" not in c.metadata.get("tags", [])]
        assert all(len(c.source.splitlines()) <= 10 for c in logic), f"{name} has a long code cell"


def test_the_metrics_carry_the_language_evaluation_and_table2_its_rows(pipeline_run, run_metrics):
    """Every task scored with its items and interval, or left out with a warning (the six plays give
    too few agreement pairs); the same items for every arm; Table 2's rows for the tasks scored."""
    from llm_nb_utils import report
    packs = {n: m["language"] for n, m in run_metrics.items()}
    assert len({p["fingerprint"] for p in packs.values()}) == 1
    for name, p in packs.items():
        for task in ("last_word", "gender", "number"):
            if task in p["tasks"]:
                t = p["tasks"][task]
                assert t["n"] == len(t["correct"]) >= 40 and t["ci"][0] <= t["accuracy"] <= t["ci"][1]
            else:
                assert any("left out" in w for w in p["warnings"]), (task, p["warnings"])
                assert set(p["warnings"]) <= set(run_metrics[name]["warnings"])       # in the report's cautions
        assert set(p["generation"]) >= {"in_vocabulary", "distinct_2", "distinct_3", "repetition"}
    assert "last_word" in packs["gpt2"]["tasks"]
    t2 = pd.read_csv(pipeline_run / "table2.csv", index_col="metric")
    scored = [t for t in report.LANG_TASKS if t in packs["gpt2"]["tasks"]]
    assert [i for i in t2.index if i.startswith("lang_")] == [f"lang_{t}" for t in scored] + ["lang_combined"]
    assert t2.loc["lang_last_word", "gpt2"] == pytest.approx(100 * packs["gpt2"]["tasks"]["last_word"]["accuracy"])


def test_report_tables_left_align_columns_of_words_and_keep_numbers_right():
    from llm_nb_utils.pipeline import _align_text_cells
    table = ('<head></head><table border="1" class="dataframe"><thead><tr><th></th><th>what</th><th>bytes</th></tr>'
             '</thead><tbody><tr><th>GPT-2</th><td>learned embedding</td><td>1,024</td></tr>'
             '<tr><th>Dense</th><td>rotary</td><td>512</td></tr>'
             '<tr><th>MoE</th><td>no</td><td>512 B</td></tr></tbody></table>')
    html = _align_text_cells(table)
    assert '<th class="text">what</th><th>bytes</th>' in html                   # the header follows its column
    assert '<td class="text">learned embedding</td><td>1,024</td>' in html
    assert '<td class="text">no</td><td>512 B</td>' in html                      # a short word in a column of words
    assert "td.text" in html.split("</head>")[0]
