"""Faults and bad input (issue #14): each gets one clear line and loses nothing already computed."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import curve
from llm_nb_utils import checkpoint as ckpt
from llm_nb_utils import files, tracking
from llm_nb_utils import engine, step
from llm_nb_utils.train import train_model
from llm_nb_utils.config import ConfigError, make_config
from llm_nb_utils.corpus import scan_corpus
from llm_nb_utils.env import REPO
from llm_nb_utils.files import StorageError
from llm_nb_utils.lock import RunLocked
from llm_nb_utils.pipeline import main
from llm_nb_utils.prepare import prepare_data

quiet = dict(progress=False, log=lambda *_: None)


def cfg(**kw):
    return make_config("smoke", **{"device": "cpu", "wandb_mode": "disabled", **kw})


@pytest.fixture(autouse=True)
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")      # the environment wins over the settings


@pytest.fixture
def run(prepared_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(prepared_run / "data", d / "data")
    return d


# --- 1. two runs on one folder ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_training_in_the_same_folder_refuses_at_once_and_damages_nothing(run, monkeypatch):
    code = ("import sys; from llm_nb_utils.config import make_config; from llm_nb_utils.train import train_model\n"
            "train_model('gpt2', make_config('smoke', device='cpu', max_steps=100000, max_epochs=100, "
            "checkpoint_every=20, wandb_mode='disabled'), sys.argv[1], progress=False)")
    first = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        deadline = time.time() + 120
        while len(ckpt.list_checkpoints(run / "checkpoints" / "gpt2")) < 2:    # training, and checkpointing
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()
            time.sleep(0.2)
        with monkeypatch.context() as m:       # at once: refused before a model is even built
            m.setattr(engine, "build_model", lambda *a: pytest.fail("built a model before refusing"))
            with pytest.raises(RunLocked, match=rf"training gpt2 is already running in .*\(pid {first.pid} on .*, since "):
                train_model("gpt2", cfg(max_steps=10), run, **quiet)
    finally:
        first.send_signal(signal.SIGKILL)     # dies holding the lock
        first.wait()
    for path in ckpt.list_checkpoints(run / "checkpoints" / "gpt2"):
        assert ckpt.load_checkpoint(path)["state"]["step"] % 20 == 0      # every one whole
    # The dead process's lock is taken over: the next run resumes its last checkpoint and goes on,
    # and removes what a writer killed mid-save may have left.
    step = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints" / "gpt2"))["state"]["step"]
    done = train_model("gpt2", cfg(max_steps=step + 2, max_epochs=100, checkpoint_every=20), run, **quiet)
    assert done["steps"] == step + 2
    assert not list((run / "checkpoints" / "gpt2").glob(".*.tmp"))


def test_temporary_names_are_unique_to_the_writer(tmp_path):
    assert files.temp_path(tmp_path / "train.bin") == tmp_path / f".train.bin.{os.getpid()}.tmp"


# --- 2. damaged files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("damaged", ["gpt2_samples.json", "gpt2.json"])
def test_a_truncated_metrics_or_samples_file_is_rebuilt_on_the_rerun(run, damaged):
    first = train_model("gpt2", cfg(max_steps=5), run, **quiet)
    (run / "metrics" / damaged).write_text('{"model": "gp')           # a kill mid-write, as it once was
    logs = []
    again = train_model("gpt2", cfg(max_steps=5), run, progress=False, log=logs.append)
    assert any("is damaged" in m and "rebuilt from the final checkpoint" in m for m in logs)
    assert again["test_loss"] == first["test_loss"] and again["samples"] == first["samples"]
    json.loads((run / "metrics" / damaged).read_text())


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_and_says_so(run, tmp_path):
    c = cfg(max_steps=10, checkpoint_every=5)
    straight = train_model("gpt2", c, run, **quiet)
    other = tmp_path / "other"
    shutil.copytree(run / "data", other / "data")
    train_model("gpt2", c, other, **quiet)
    latest = ckpt.latest_checkpoint(other / "checkpoints" / "gpt2")
    latest.write_bytes(latest.read_bytes()[:1000])                      # truncated
    (other / "metrics" / "gpt2.json").unlink()
    logs = []
    resumed = train_model("gpt2", c, other, progress=False, log=logs.append)
    assert any("step_00000010.pt could not be read" in m and "resumes from the checkpoint before it" in m
               for m in logs)
    assert (latest.parent / "step_00000010.pt.damaged").exists()
    assert curve(resumed["history"]) == curve(straight["history"]) and resumed["test_loss"] == straight["test_loss"]


# --- 3. read-only and full disks ------------------------------------------------------------------------

@contextlib.contextmanager
def small_filesystem(path, size, options=""):
    """A tmpfs of `size` at `path` where this machine lets us mount one (root in a sandbox), else None."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                       capture_output=True)
    if r.returncode:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path, tiny_corpus, capsys):
    with small_filesystem(tmp_path / "ro", "1m", ",ro") as ro:
        if ro is None:
            pytest.skip("cannot mount a read-only filesystem here (as root, permissions alone do not stop writes)")
        assert main(["--preset", "smoke", "--corpus-dir", str(tiny_corpus), "--out", str(ro / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is read-only" in err and "choose a writable run_dir" in err, err


def test_the_storage_messages_name_the_folder_and_the_fix(tmp_path):
    import errno
    e = files.storage_error(OSError(errno.EROFS, "Read-only file system"), tmp_path / "x" / "table2.csv")
    assert isinstance(e, StorageError) and str(e).startswith(f"{tmp_path / 'x'} is read-only (writing table2.csv")
    e = files.storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "a.pt", needed_bytes=3 * 10**9)
    assert f"the disk holding {tmp_path} is full (" in str(e) and "the run needs about 3.00 GB in all" in str(e)
    other = OSError(errno.ENOENT, "No such file")
    assert files.storage_error(other, tmp_path / "a") is other


def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_the_rerun_is_exact(run, tmp_path, monkeypatch):
    c = cfg(max_steps=10, checkpoint_every=5)
    straight = train_model("gpt2", c, run, **quiet)
    with small_filesystem(tmp_path / "full", "60m") as full:   # room for one 40 MB checkpoint, not two
        if full is None:
            pytest.skip("cannot mount a small filesystem here")
        work = full / "run"
        shutil.copytree(run / "data", work / "data")
        monkeypatch.setattr(ckpt, "free_bytes", lambda *_: 10**12)   # pass the up-front check: fill for real
        with pytest.raises(StorageError) as e:
            train_model("gpt2", c, work, **quiet)
        msg = str(e.value)
        assert "is full" in msg and "while writing step_00000010.pt; the run needs about" in msg and "\n" not in msg
        assert e.value._render_traceback_() == [f"StorageError: {msg}"]             # one line in a notebook
        assert [p.name for p in (work / "checkpoints" / "gpt2").iterdir()] == ["step_00000005.pt"]   # no partial file
        shutil.move(str(work), tmp_path / "freed")                                   # "free some space"
    monkeypatch.undo()
    resumed = train_model("gpt2", c, tmp_path / "freed", **quiet)
    assert curve(resumed["history"]) == curve(straight["history"]) and resumed["test_loss"] == straight["test_loss"]


def test_too_little_space_for_the_checkpoints_is_refused_up_front_with_the_estimate(run, monkeypatch):
    monkeypatch.setattr(ckpt, "free_bytes", lambda *_: 5 * 10**6)
    with pytest.raises(StorageError, match=r"has 0.01 GB free, and gpt2's checkpoints need about 0.1\d GB \(3 kept"):
        train_model("gpt2", cfg(max_steps=5), run, **quiet)


def test_a_disk_that_fills_during_data_preparation_leaves_no_partial_file(tmp_path, tiny_corpus, monkeypatch):
    with small_filesystem(tmp_path / "full", "100k") as full:
        if full is None:
            pytest.skip("cannot mount a small filesystem here")
        monkeypatch.setattr("llm_nb_utils.prepare.free_bytes", lambda *_: 10**12)
        with pytest.raises(StorageError, match="is full .* while writing train.bin"):
            prepare_data(tiny_corpus, full / "data", log=lambda *_: None)
        assert sorted(p.name for p in (full / "data").iterdir()) == [".prepare.lock"]


# --- 4. settings and parameters ------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["split_ratios=0.5", 'split_ratios="0.8"', "split_ratios=[0.8,'0.1',0.1]",
                                     "seed=1.5", "lr=None", "qk_norm=maybe"])
def test_every_bad_setting_is_exit_2_and_one_line(setting, tmp_path, capsys):
    assert main(["--preset", "smoke", "--out", str(tmp_path / "run"), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and setting.split("=")[0] in err, err
    assert not (tmp_path / "run").exists()


def test_python_values_of_the_wrong_type_are_refused_in_one_place():
    for bad in [dict(seed=1.5), dict(lr=None), dict(split_ratios=0.5), dict(qk_norm=1), dict(dtype=16)]:
        with pytest.raises(ConfigError) as e:
            make_config("smoke", bad)
        assert "\n" not in str(e.value) and next(iter(bad)) in str(e.value)


@pytest.mark.slow
def test_papermill_overrides_as_a_json_string_work_and_a_bad_parameter_is_one_line(tiny_corpus, tmp_path):
    import nbformat
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    nb = REPO / "notebooks" / "01_data_prep.ipynb"
    out = tmp_path / "01.ipynb"
    pm.execute_notebook(str(nb), str(out), cwd=str(nb.parent), progress_bar=False, kernel_name="python3",
                        parameters=dict(preset="smoke", corpus_dir=str(tiny_corpus), run_dir=str(tmp_path / "run"),
                                        overrides='{"batch_size": 2, "device": "cpu"}'))     # what -p passes
    text = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"
                   for o in c.outputs)
    assert 'changed settings: {"batch_size": 2, "device": "cpu"}' in text
    with pytest.raises(PapermillExecutionError) as e:
        pm.execute_notebook(str(nb), str(out), cwd=str(nb.parent), progress_bar=False, kernel_name="python3",
                            parameters=dict(preset="smoke", seed=1.5, run_dir=str(tmp_path / "run")))
    assert e.value.ename == "ConfigError"
    err = [o for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code" for o in c.outputs
           if o.output_type == "error"][0]
    assert err.traceback == ["ConfigError: invalid configuration: seed must be an integer (got float 1.5)"]


# --- 5. a corpus too small to mean anything --------------------------------------------------------------------

def test_a_1kb_corpus_warns_up_front_and_the_report_says_so(tmp_path):
    from llm_nb_utils.report import cautions
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("Era uma vez uma menina que morava em Lisboa, perto do rio. " * 17)
    assert 990 < (tmp_path / "c" / "a.txt").stat().st_size < 1100
    prepare_data(tmp_path / "c", tmp_path / "run" / "data", log=lambda *_: None)
    logs = []
    c = cfg(context_length=16, stride=16)         # so that the 10% splits hold a window at all
    m = train_model("gpt2", c, tmp_path / "run", progress=False, log=logs.append)
    warnings = [l for l in logs if l.startswith("warning: ")]
    steps = m["steps"]
    assert steps < 10
    assert any(f"gives only {steps} steps" in w and "fewer than the max_steps=30 asked" in w for w in warnings)
    assert any("no periodic evaluation" in w for w in warnings)
    assert any("the val split has only" in w and "it reads all of them" in w for w in warnings)
    assert m["evaluation"]["val"]["how"] == "all"
    assert [h["step"] for h in m["history"]] == [steps]          # the curve still has its last point
    assert f"Caution (GPT-2 baseline):** the training data gives only {steps} steps" in cautions({"gpt2": m})


# --- 6. W&B online without network ------------------------------------------------------------------------------

def test_wandb_online_with_an_unreachable_server_falls_back_to_offline_in_seconds(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import socket
    with socket.socket() as s:          # a loopback port with nothing listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(tracking, "_reachable", {})
    t0 = time.time()
    tracker = tracking.init_tracking(cfg(wandb_mode="online"), tmp_path, "gpt2")
    elapsed = time.time() - t0
    tracker.finish()
    assert tracker.mode == "offline" and f"127.0.0.1:{port} cannot be reached" in tracker.message
    assert "Internet" in tracker.message and elapsed < 30          # it used to wait 61 s per init
    t0 = time.time()
    assert tracking.wandb_unreachable() and time.time() - t0 < 0.1      # asked once per process


# --- 7. agreement with transformers -----------------------------------------------------------------------------

def test_the_exported_aux_loss_coefficient_gives_transformers_the_same_penalty():
    pytest.importorskip("transformers")
    from llm_nb_utils.export_hf import to_hf
    from llm_nb_utils.arms import build_model
    from llm_nb_utils.moe import balancing_loss
    c = cfg(n_layers=1, num_experts=4, num_experts_per_token=2, aux_loss_coef=0.01)   # one layer: no pooling
    model = build_model("moe_gqa", c).eval()
    x = torch.randint(0, c.vocab_size, (2, 16))
    with torch.no_grad():
        ours = c.aux_loss_coef * balancing_loss(model(x, x).routing)
        hf = to_hf(model)
        out = hf(input_ids=x, labels=x, output_router_logits=True)
    theirs = hf.config.router_aux_loss_coef * out.aux_loss
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-5)
    assert hf.config.router_aux_loss_coef == pytest.approx(0.005)


# --- 8. data that is not prose -----------------------------------------------------------------------------------

def test_documents_that_are_not_prose_are_dropped_and_listed_with_the_reason(tmp_path, tiny_corpus):
    c = tmp_path / "c"
    shutil.copytree(tiny_corpus, c)
    (c / "nul.txt").write_bytes(b"\x00" * 200_000)
    import base64
    (c / "blob.txt").write_text(base64.b64encode(os.urandom(6000)).decode())
    (c / "tabela.txt").write_text("\n".join(f"{i} {i * 3.5:.2f} {i ** 2}" for i in range(500)))
    scan = scan_corpus(c)
    status = {d.path: d.status for d in scan.docs}
    assert (status["nul.txt"], status["blob.txt"], status["tabela.txt"]) == (
        "control_characters", "no_spaces", "few_letters")
    assert all(s == "kept" for p, s in status.items() if p not in ("nul.txt", "blob.txt", "tabela.txt"))
    logs = []
    meta = prepare_data(c, tmp_path / "data", log=logs.append)
    assert set(meta["dropped"]["not_prose"]) == {"nul.txt", "blob.txt", "tabela.txt"}
    assert meta["dropped"]["not_prose"]["nul.txt"].startswith("control_characters: 200,000 control characters")
    assert any(l.startswith("dropped blob.txt: no_spaces") for l in logs)
