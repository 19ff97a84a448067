"""Starting a training in several processes (GPUs, or CPU processes for tests) with torchrun.

`launch_torchrun` runs

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m llm_nb_utils.worker --model gpt2 ...

in a subprocess, streams rank 0's lines, forwards a Ctrl-C to the ranks so that they save at the
same step, and raises a one-line error naming the failing rank's error. It is called by the front
door (`train.train_model(..., gpus=2)`), which holds the run's lock and then reads what the ranks
wrote. The ranks run `worker.py`; nothing here runs inside them.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from .config import Config
from .errors import SuiteError, TrainingInterrupted

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupted|Locked)\b: ")


class DistributedRunError(SuiteError, RuntimeError):
    pass


def torchrun_command(name: str, cfg: Config, run_dir: Path, nproc: int, resume: bool, lock_held: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llm_nb_utils.worker", "--model", name, "--run-dir", str(run_dir), "--config", cfg.to_json()]
    if lock_held:
        cmd.append("--lock-held")
    if not resume:
        cmd.append("--no-resume")
    return cmd


def _children(pid: int) -> list[int]:
    """The worker processes torchrun started (Linux /proc; empty elsewhere)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _stream(proc: subprocess.Popen, log, lines: list[str]) -> None:
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        log(line)


def launch_torchrun(name: str, cfg: Config, folder, nproc: int, resume: bool = True, log=print) -> None:
    """Train `name` in `nproc` processes under torchrun, in the run folder whose lock the caller holds."""
    run_dir = folder.path.resolve()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",    # rank 0's lines as they come
           # every worker imports this very package (a clone need not be installed)
           "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           # torchrun would set 1 and say so; share the cores out instead
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    log(f"{name}: training in {nproc} processes with torchrun (DistributedDataParallel)")
    lines: list[str] = []
    # A session of its own: a Ctrl-C reaches the workers through us (below), not torchrun, which
    # would stop them before they could save.
    proc = subprocess.Popen(torchrun_command(name, cfg, run_dir, nproc, resume, lock_held=True), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _stream(proc, log, lines)
        rc = proc.wait()
    except KeyboardInterrupt:
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGINT)          # each rank saves at the same step, then stops
        try:
            _stream(proc, log, lines)
            proc.wait(timeout=300)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGKILL)
        raise TrainingInterrupted(f"{name}: interrupted; the {nproc} processes saved their state in the "
                                  "run directory. Run again with resume=True to continue.") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if rc != 0:
        cause = next((l.strip() for l in reversed(lines) if ERROR_LINE.match(l.strip())), f"exit status {rc}")
        raise DistributedRunError(f"{name}: the {nproc}-process training failed: {cause}. The output of the "
                                  "failing rank is above; finished checkpoints are kept, and the same call resumes.")
