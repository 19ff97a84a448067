"""The front door of training: `train_model(arm, cfg, run_dir)`.

It holds the run directory's lock for that arm, then trains in this process (`engine.run_training`)
or, with `gpus` above 1, in that many processes under torchrun (`launch.launch_torchrun`), and
returns the metrics with the trained model either way. With `resume=True` (the default) a run
continues from its latest readable checkpoint, or just reloads a finished run.

    result = train_model("gpt2", cfg, "outputs/run-small")
    result["test_loss"], result["model"]
"""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .device import resolve_device
from .distributed import init_process, resolve_gpus
from .engine import run_training
from .launch import launch_torchrun
from .runfolder import RunFolder


def train_model(name: str, cfg: Config, run_dir: str | Path, resume: bool = True, progress: bool = True,
                log=print, progress_interval_s: float = 60.0, gpus=1) -> dict:
    """Train arm `name` and return its metrics dict (also written to `<run_dir>/metrics/<name>.json`),
    with the trained model under "model". progress=False (batch runs): a progress line every
    `progress_interval_s` seconds and one per evaluation instead of a bar. W&B follows cfg.wandb_mode
    (the WANDB_MODE variable wins).

    gpus: 1, a number, or "auto" (every visible CUDA GPU). Above 1, the training runs under torchrun
    in processes of its own and this returns what they wrote."""
    folder = RunFolder(run_dir)
    n = resolve_gpus(gpus, cfg.device)
    with folder.training_lock(name):
        if n > 1:
            launch_torchrun(name, cfg, folder, n, resume=resume, log=log)
            model = folder.load_trained_model(name, cfg, resolve_device(cfg.device))
            return {**folder.load_metrics(name), "model": model}
        return run_training(name, cfg, folder, init_process(cfg.device, log), resume=resume, progress=progress,
                            log=log, progress_interval_s=progress_interval_s)
