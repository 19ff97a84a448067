"""Data-parallel training on this CPU with gloo: the same experiment as one process, resumable with
another number of processes, and a dead rank that takes the run down instead of hanging it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import curve
from llm_nb_utils.config import ConfigError
from llm_nb_utils.distributed import Dist, resolve_gpus
from llm_nb_utils.env import REPO
from llm_nb_utils.launch import torchrun_command
from llm_nb_utils.moe import GroupedExperts, MoEFeedForward


# --- the pieces --------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouped", [True, False])
def test_an_expert_without_tokens_still_gets_a_gradient(grouped, monkeypatch):
    """DDP without find_unused_parameters needs every parameter in every backward: the stacked
    experts give an idle expert a zero gradient slice instead of no gradient."""
    if not grouped:
        monkeypatch.setattr(GroupedExperts, "uses_grouped_mm", lambda *a: False)
    torch.manual_seed(0)
    moe = MoEFeedForward(emb_dim=8, hidden_dim=16, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight.fill_(-1.0)
        moe.router.weight[0].fill_(1.0)          # positive inputs: every token to expert 0
    out, routing = moe(torch.rand(2, 5, 8) + 0.1)
    out.sum().backward()
    assert routing.counts.tolist() == [10, 0, 0, 0]
    for p in moe.parameters():
        assert p.grad is not None
    assert moe.experts.w_gate.grad[0].abs().sum() > 0 and moe.experts.w_gate.grad[1:].abs().sum() == 0


def test_each_rank_takes_its_slice_of_the_global_batch():
    batch = torch.arange(8).view(8, 1)
    assert [Dist(rank=r, world_size=2).shard(batch).flatten().tolist() for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    last = torch.arange(1).view(1, 1)                          # a partial evaluation batch
    assert [len(Dist(rank=r, world_size=2).shard(last)) for r in (0, 1)] == [1, 0]
    with pytest.raises(ConfigError, match=r"batch_size \(6\) is not divisible by the number of processes \(4\)"):
        Dist(world_size=4).check_batch(6)


def test_gpus_setting():
    assert resolve_gpus("auto", "cpu") == 1
    assert resolve_gpus("2", "cpu") == 2 and resolve_gpus(3, "cpu") == 3
    for bad in ("two", 0, True):
        with pytest.raises(ConfigError, match="gpus must be"):
            resolve_gpus(bad, "cpu")


def test_gpus_of_different_kinds_or_too_many_are_refused(monkeypatch):
    from llm_nb_utils.device import DeviceError
    from llm_nb_utils.distributed import check_gpus
    gpus = [("Tesla P100-PCIE-16GB", (6, 0)), ("Tesla T4", (7, 5))]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: gpus[i][1])
    with pytest.raises(DeviceError, match=r"different kinds \(Tesla P100-PCIE-16GB, Tesla T4\).*Fix: gpus=1"):
        check_gpus(2)
    with pytest.raises(DeviceError, match="3 GPUs were asked for but 2 are visible"):
        check_gpus(3)
    gpus[0] = gpus[1]
    check_gpus(2)                                  # two T4s: fine


# --- whole runs ----------------------------------------------------------------------------------------
def run_dir_with_data(prepared_run, path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "data").symlink_to(prepared_run / "data", target_is_directory=True)
    return path


def test_the_workers_to_interrupt_are_found_as_the_launchers_children():
    """What a Ctrl-C is forwarded to: torchrun's children, here a parent that started one sleeper."""
    from llm_nb_utils.launch import _children
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, time; c = subprocess.Popen(['sleep', '60']); "
                               "print(c.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _children(parent.pid) == [child]
        assert _children(child) == []
    finally:
        for pid in _children(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


@pytest.fixture(scope="module")
def ddp_cfg():
    from llm_nb_utils.config import make_config
    return make_config("smoke", device="cpu", batch_size=8, max_steps=30, eval_freq=10, checkpoint_every=15,
                       test_windows=160, wandb_mode="disabled")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "moe_gqa"])
def test_two_processes_train_as_one_and_resume_as_one(name, ddp_cfg, prepared_run, tmp_path):
    from llm_nb_utils.train import train_model
    quiet = lambda *a, **k: None
    one = train_model(name, ddp_cfg, run_dir_with_data(prepared_run, tmp_path / "one"), progress=False, log=quiet)
    lines = []
    two = train_model(name, ddp_cfg, run_dir_with_data(prepared_run, tmp_path / "two"), progress=False,
                      log=lines.append, gpus=2)
    assert two["world_size"] == 2 and len(two["peak_memory_mb_per_rank"]) == 2
    assert any("2 processes (gloo), 4 windows each per step" in l for l in lines), lines
    assert two["tokens_seen"] == one["tokens_seen"] == 30 * 8 * ddp_cfg.context_length
    assert len(curve(two["history"])) == len(curve(one["history"]))
    # fp32 sums in another order (a rank multiplies half a batch): equal to a few parts in a million.
    # Measured on the evaluation windows spread over the splits: 1.6e-6 relative (1.3e-5 absolute at 8.33).
    for a, b in zip(curve(one["history"]), curve(two["history"])):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    # The 2-process checkpoint at step 15, continued by one process, ends where one process ends.
    ckpts = tmp_path / "two" / "checkpoints" / name
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000015.pt", "step_00000030.pt"]
    (ckpts / "step_00000030.pt").unlink()
    shutil.rmtree(tmp_path / "two" / "metrics")
    resumed = train_model(name, ddp_cfg, tmp_path / "two", progress=False, log=quiet)
    assert resumed["world_size"] == 1
    for a, b in zip(curve(one["history"]), curve(resumed["history"])):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert resumed["test_loss"] == pytest.approx(one["test_loss"], abs=1e-5)


@pytest.mark.slow
def test_a_rank_killed_takes_the_launcher_down_within_30_seconds(ddp_cfg, prepared_run, tmp_path):
    run = run_dir_with_data(prepared_run, tmp_path / "run")
    cfg = ddp_cfg.replace(max_steps=0, max_epochs=100, checkpoint_every=100000, eval_freq=100000)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun_command("gpt2", cfg, run, 2, True), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        workers = []
        while time.time() < deadline and proc.poll() is None:      # both ranks started, and training
            workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            if len(workers) == 2 and (run / "checkpoints" / ".gpt2.lock").exists():
                break
            time.sleep(0.5)
        assert len(workers) == 2, proc.stdout.read() if proc.poll() is not None else "workers did not start"
        time.sleep(3)
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0, out
        assert time.time() - killed < 30, f"the launcher took {time.time() - killed:.0f} s to stop"
        assert "SIGKILL" in out or "Signal 9" in out or "exitcode: -9" in out, out[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_step_with_its_state_saved(ddp_cfg, prepared_run, tmp_path):
    """SIGINT to the process that launched torchrun (a notebook kernel gets it from the stop button)."""
    run = run_dir_with_data(prepared_run, tmp_path / "run")
    cfg = ddp_cfg.replace(max_steps=0, max_epochs=100, checkpoint_every=100000, eval_freq=100000)
    code = ("import sys, json; from llm_nb_utils.config import Config; from llm_nb_utils.train import train_model\n"
            "from llm_nb_utils.errors import TrainingInterrupted\n"
            "try:\n    train_model('moe_gqa', Config(**json.loads(sys.argv[2])), sys.argv[1], progress=False, gpus=2)\n"
            "except TrainingInterrupted as e:\n    print('INTERRUPTED:', e); sys.exit(130)\n")
    # As from a terminal or a notebook: SIGINT raises KeyboardInterrupt. A suite started in the background
    # by a non-interactive shell inherits SIGINT ignored, and Python then installs no handler for it.
    proc = subprocess.Popen([sys.executable, "-c", code, str(run), json.dumps(cfg.to_dict())], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:                      # rank 0's lines arrive as they are printed
        lines.append(line)
        if line.startswith("moe_gqa: about "):    # the estimate: both ranks are in the training loop
            break
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "INTERRUPTED: moe_gqa: interrupted" in out and "Run again with resume=True" in out
    saved = list((run / "checkpoints" / "moe_gqa").glob("step_*.pt"))
    assert len(saved) == 1, out
    step = int(saved[0].stem.split("_")[1])
    assert step > 0 and step % cfg.log_every == 0     # the ranks agreed on a step where they compare flags
