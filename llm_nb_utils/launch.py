"""Training on several GPUs (or CPU processes) with torchrun, from a notebook or from a shell.

From a notebook or the pipeline, `train_model(..., gpus=2)` calls `launch_training`, which runs

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m llm_nb_utils.launch --model gpt2 ...

in a subprocess, streams rank 0's lines, and returns the metrics and the trained model as a
one-process run does. From a shell, for a script or several nodes, call the same entry point:

    torchrun --nproc_per_node=8 -m llm_nb_utils.launch --model moe_gqa --preset paper --run-dir outputs/run-paper
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m llm_nb_utils.launch --model gpt2 --preset paper --run-dir /shared/run-paper

(the run directory, with its prepared data/, must be readable by every node).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .arms import ARM_NAMES
from .config import Config, make_config, parse_overrides
from .errors import SuiteError, TrainingInterrupted
from .lock import folder_lock

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupted|Locked)\b: ")


class DistributedRunError(SuiteError, RuntimeError):
    pass


def torchrun_command(name: str, cfg: Config, run_dir: Path, nproc: int, resume: bool, wandb_mode: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llm_nb_utils.launch", "--model", name, "--run-dir", str(run_dir), "--config", json.dumps(cfg.to_dict())]
    if not resume:
        cmd.append("--no-resume")
    if wandb_mode:
        cmd += ["--wandb-mode", wandb_mode]
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


def launch_training(name: str, cfg: Config, run_dir: str | Path, nproc: int, resume: bool = True,
                    wandb_mode: str | None = None, log=print) -> dict:
    """Train `name` in `nproc` processes under torchrun; return its metrics with the model loaded."""
    from .train import load_metrics, load_trained_model
    run_dir = Path(run_dir).resolve()
    env = {**os.environ, "LLM_NB_LOCK_HELD": "1", "PYTHONUNBUFFERED": "1",    # rank 0's lines as they come
           # every worker imports this very package (a clone need not be installed)
           "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           # torchrun would set 1 and say so; share the cores out instead
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    log(f"{name}: training in {nproc} processes with torchrun (DistributedDataParallel)")
    lines: list[str] = []
    with folder_lock(run_dir / "checkpoints", f"training {name}", name):
        # A session of its own: a Ctrl-C reaches the workers through us (below), not torchrun, which
        # would stop them before they could save.
        proc = subprocess.Popen(torchrun_command(name, cfg, run_dir, nproc, resume, wandb_mode), env=env,
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
    return {**load_metrics(run_dir, name), "model": load_trained_model(run_dir, name, cfg)}


def main(argv=None) -> int:
    """The worker's entry point: torchrun starts it once per rank."""
    from torch.distributed.elastic.multiprocessing.errors import record
    from .train import train_model

    p = argparse.ArgumentParser(prog="torchrun ... -m llm_nb_utils.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=ARM_NAMES)
    p.add_argument("--run-dir", required=True, help="a run directory whose data/ is prepared (notebook 01)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--config", default="", help="the whole configuration as JSON (what launch_training passes)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])
    args = p.parse_args(argv)
    cfg = Config(**json.loads(args.config)) if args.config else make_config(args.preset, parse_overrides(args.set))

    @record          # torchrun's summary then shows the failing rank's traceback
    def run():
        train_model(args.model, cfg, args.run_dir, resume=not args.no_resume, progress=False,
                    wandb_mode=args.wandb_mode)

    start = time.time()
    finished = False
    try:
        run()
        finished = True
    finally:
        from torch import distributed as dist
        if dist.is_initialized():
            # Rank 0 still writes metrics and samples when the others are done; a rank that tore the
            # gloo group down meanwhile was aborted now and then ("terminate called without an active
            # exception"). So the ranks that finished wait for each other first; a failed one does not.
            if finished:
                dist.barrier()
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.model}: {int(os.environ.get('WORLD_SIZE', '1'))} processes done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
