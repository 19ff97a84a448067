"""First contact (issue #12): a notebook opened anywhere, `make run` on a CPU, Ctrl-C, quiet logs."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import nbformat
import pytest
import torch

from conftest import curve
from llm_nb_utils import pipeline
from llm_nb_utils.env import NOTEBOOK_DIR, REPO
from llm_nb_utils.pipeline import NOTEBOOKS
from llm_nb_utils.progress import TrainingProgress, format_duration

EXPECTED_PARAMETERS = {
    "preset": "str", "overrides": "dict", "run_dir": "str", "corpus_source": "str", "corpus_dir": "str",
    "gutenberg_target_mb": "float", "split_method": "str", "seed": "int", "allow_undecodable": "bool",
    "wandb_mode": "str", "resume": "bool", "max_steps": "int", "gpus": "str", "progress": "bool",
    "package_source": "str"}


def cells(name):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4).cells


def bootstrap_source(name="01_data_prep"):
    return next(c.source for c in cells(name) if "bootstrap" in c.metadata.get("tags", []))


SWEEP_PARAMETERS = {"grid": "str", "arms": "str", "dense_iso_total": "bool", "seeds": "int", "experts": "list", "experts_per_token": "list",
                    "keep_active_params": "bool", "budget_tokens": "int", "max_hours": "float", "kernel": "str",
                    "seed_spread_from": "str"}


@pytest.mark.parametrize("name", (*NOTEBOOKS, "06_sweep"))
def test_papermill_reads_every_parameter_with_its_type_and_no_warning(name, caplog):
    import papermill as pm
    with caplog.at_level(logging.WARNING, logger="papermill"):
        params = pm.inspect_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"))
    expected = {**EXPECTED_PARAMETERS, **(SWEEP_PARAMETERS if name == "06_sweep" else {})}
    assert {k: v["inferred_type_name"] for k, v in params.items()} == expected
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_every_notebook_starts_with_its_parameters_then_the_same_bootstrap():
    for name in (*NOTEBOOKS, "06_sweep"):
        code = [c for c in cells(name) if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.tags, name
        assert "bootstrap" in code[1].metadata.tags and "remove_cell" in code[1].metadata.tags, name
        assert code[1].source == bootstrap_source(), name


@pytest.fixture(scope="module")
def kaggle_layout(tmp_path_factory):
    """A working directory holding a clone of the repository, as on Kaggle or Colab."""
    work = tmp_path_factory.mktemp("working")
    repo = work / "llm-suite"
    repo.mkdir()
    for item in ("llm_nb_utils", "notebooks"):
        shutil.copytree(REPO / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copyfile(REPO / item, repo / item)
    return work, repo


@pytest.mark.slow
def test_a_notebook_runs_from_a_working_directory_that_holds_the_clone(kaggle_layout, tiny_corpus):
    import papermill as pm
    work, repo = kaggle_layout
    run = work / "outputs" / "run-smoke"
    executed = work / "01_data_prep.ipynb"
    pm.execute_notebook(str(repo / "notebooks" / "01_data_prep.ipynb"), str(executed), cwd=str(work),
                        parameters=dict(preset="smoke", corpus_dir=str(tiny_corpus), run_dir=str(run),
                                        overrides={"device": "cpu"}, progress=False),
                        kernel_name="python3", progress_bar=False)
    out = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells
                  if c.cell_type == "code" for o in c.outputs)
    assert f"llm_nb_utils 0.1.0 from {repo / 'llm_nb_utils'}\n" in out      # the clone below, not this checkout
    assert (run / "table1.csv").exists() and (run / "data" / "train.bin").stat().st_size > 0


def run_bootstrap(cwd, package_source, env):
    code = f"package_source = {package_source!r}\n" + bootstrap_source()
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_alone_the_first_cell_installs_the_package_from_package_source(kaggle_layout, tmp_path):
    """A notebook imported alone from GitHub: no clone anywhere, so the first cell pip-installs the
    package; the copied clone's path stands in for the git URL (no network here)."""
    work, repo = kaggle_layout
    site, alone = tmp_path / "site", tmp_path / "alone"
    site.mkdir(), alone.mkdir()
    build = tmp_path / "src"      # pip builds a local path in place: give it a copy of its own
    shutil.copytree(repo, build)
    # Dependencies are already here; PIP_NO_BUILD_ISOLATION=0 means "no build isolation" (pip's spelling).
    env = {**os.environ, "PIP_TARGET": str(site), "PYTHONPATH": str(site), "PIP_NO_DEPS": "1",
           "PIP_NO_BUILD_ISOLATION": "0"}
    env.pop("LLM_NB_PACKAGE", None)
    r = run_bootstrap(alone, str(build), env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"llm_nb_utils 0.1.0 from {site / 'llm_nb_utils'}"
    assert (site / "llm_nb_utils" / "notebooks" / "04_moe_gqa.ipynb").exists()   # the pipeline's notebooks travel


def test_alone_without_a_source_the_first_cell_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_NB_PACKAGE", "PYTHONPATH")}
    r = run_bootstrap(tmp_path, "", env)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: llm_nb_utils not found. Fix:") and "package_source" in last


def fake_run(monkeypatch):
    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda params, out, *a, **k: seen.update(params=params, out=out) or [])
    return seen


def test_without_a_gpu_the_default_preset_is_small_and_says_why(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = fake_run(monkeypatch)
    assert pipeline.main(["--out", str(tmp_path)]) == 0
    assert seen["params"]["preset"] == "small"
    assert "[pipeline] preset: small (auto: no usable CUDA GPU (torch" in capsys.readouterr().out


def test_the_paper_preset_on_a_cpu_is_refused_at_once_with_both_ways_forward(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = fake_run(monkeypatch)
    assert pipeline.main(["--preset", "paper", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset small" in err and "--set device=cpu" in err
    assert not seen and not (tmp_path / "run").exists()
    assert pipeline.main(["--preset", "paper", "--set", "device=cpu", "--out", str(tmp_path / "run")]) == 0
    assert seen["params"]["preset"] == "paper"


def test_format_duration():
    assert [format_duration(s) for s in (4, 95, 3725, 200000)] == ["4 s", "1 min 35 s", "1 h 02 min", "2 d 07 h"]


def test_estimate_after_the_first_measured_steps_then_a_line_a_minute():
    now, lines = [0.0], []
    ui = TrainingProgress("gpt2", 31_000, 0, 2048, bar=False, log=lines.append, interval_s=60,
                          estimate_after=10, clock=lambda: now[0])
    for step in range(1, 41):
        now[0] += 2.5
        if step % 10 == 0:
            ui.update(step, 5.0)
    assert lines == [
        "gpt2: about 21 h 30 min for the 30,980 steps left of 31,000 (2.500 s/step over steps 11-20; "
        "evaluations add to this)",
        "gpt2 step 30/31,000 (0.1%) | loss 5.000 | 819 tokens/s | elapsed 1 min 15 s | ETA 21 h 30 min"]


def test_a_long_training_log_is_shortened_in_the_report_and_kept_whole_in_the_notebook(tmp_path):
    """Papermill records each print as it comes; the report shows the block's head and tail, says
    how many lines it left out and where they are, and leaves short outputs and other cells alone."""
    from nbformat.v4 import new_code_cell, new_notebook, new_output
    lines = [f"gpt2 step {i:,}/2,000 | loss 4.000\n" for i in range(1, 101)]
    long = new_code_cell("train_model(...)", outputs=[new_output("stream", name="stdout", text=t) for t in lines]
                         + [new_output("stream", name="stderr", text="a warning\n")])
    short = new_code_cell("print(1)", outputs=[new_output("stream", name="stdout", text="1\n2\n")])
    nb = new_notebook(cells=[long, short])
    path = tmp_path / "02_gpt2_baseline.ipynb"
    nbformat.write(nb, path)
    html = pipeline.render_html(path, tmp_path / "02.html").read_text()
    assert "gpt2 step 8/2,000" in html and "gpt2 step 9/2,000" not in html
    assert "gpt2 step 94/2,000" not in html and "gpt2 step 95/2,000" in html and "gpt2 step 100/2,000" in html
    assert "[... 86 lines left out of this report; the executed notebook notebooks/02_gpt2_baseline.ipynb " \
           "has them all ...]" in html
    assert "a warning" in html and "1\n2" in html
    assert len(nbformat.read(path, as_version=4).cells[0].outputs) == 101        # the notebook untouched


@pytest.mark.slow
def test_the_paper_preset_on_a_cpu_prints_its_estimate(prepared_run, tmp_path):
    from llm_nb_utils.config import make_config
    from llm_nb_utils.train import train_model
    shutil.copytree(prepared_run / "data", tmp_path / "data")
    # the paper model itself; evaluation, test and samples cut to one batch or token each (not what is tested)
    cfg = make_config("paper", device="cpu", max_steps=8, log_every=1, test_windows=1, sample_max_new_tokens=2,
                      eval_iter=1)
    lines = []
    train_model("gpt2", cfg, tmp_path, progress=False, log=lines.append)
    estimate = [l for l in lines if l.startswith("gpt2: about ")]
    # The clock starts at the first read-back (step 1, which pays for warm-up); 5 steps later, the estimate.
    assert len(estimate) == 1 and "for the 2 steps left of 8 (" in estimate[0] and "over steps 2-6;" in estimate[0]


PIPELINE_ARGS = ["--preset", "smoke", "--set", "device=cpu", "--only", "01_data_prep", "02_gpt2_baseline",
                 "--max-steps", "120", "--set", "eval_freq=40"]


def pipeline_cmd(corpus, out):
    return [sys.executable, "-m", "llm_nb_utils.pipeline", *PIPELINE_ARGS, "--corpus-dir", str(corpus), "--out", str(out)]


@pytest.mark.slow
def test_ctrl_c_saves_state_renders_what_ran_and_the_same_command_resumes_exactly(tiny_corpus, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out, ref = tmp_path / "run", tmp_path / "ref"
    proc = subprocess.Popen(pipeline_cmd(tiny_corpus, out), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:       # interrupt once training has started and said its estimate
        if line.startswith("gpt2: about"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "asyncio" not in err
    assert "interrupted at step" in err
    resume = f"to continue where it stopped: python -m llm_nb_utils.pipeline {' '.join(PIPELINE_ARGS)}"
    assert resume in err
    saved = list((out / "checkpoints" / "gpt2").glob("step_*.pt"))
    assert saved and not (out / "metrics" / "gpt2.json").exists()
    assert "interrupted at step" in (out / "reports" / "02_gpt2_baseline.html").read_text()

    again = subprocess.run(pipeline_cmd(tiny_corpus, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    straight = subprocess.run(pipeline_cmd(tiny_corpus, ref), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr
    resumed, uninterrupted = (json.loads((d / "metrics" / "gpt2.json").read_text()) for d in (out, ref))
    assert resumed["steps"] == uninterrupted["steps"] == 120
    assert curve(resumed["history"]) == curve(uninterrupted["history"]) and resumed["test_loss"] == uninterrupted["test_loss"]
