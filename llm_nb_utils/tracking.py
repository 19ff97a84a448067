"""Weights & Biases tracking that can never block or fail a run.

The mode comes from WANDB_MODE if set, else the config. Without an API key an online run falls
back to offline and says so. wandb not installed, or any wandb error, turns tracking off with a
one-line message; training carries on.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .files import shown

REACH_TIMEOUT_S = 3.0
_reachable: dict = {}      # (host, port) -> "" if reachable, else why not: asked once per process


class Tracker:
    def __init__(self, run=None, mode: str = "disabled", message: str = ""):
        self.run, self.mode, self.message = run, mode, message

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, data: dict, step: int | None = None) -> None:
        if self.run is not None:
            try:
                self.run.log(data, step=step)
            except Exception as e:
                self._fail(e)

    def log_checkpoint(self, path: Path, name: str) -> None:
        if self.run is None:
            return
        try:
            import wandb
            art = wandb.Artifact(name, type="model")
            art.add_file(str(path))
            self.run.log_artifact(art)
        except Exception as e:
            self._fail(e)

    def finish(self, summary: dict | None = None) -> None:
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()
        except Exception as e:
            self._fail(e)
        self.run = None

    def _fail(self, e: Exception) -> None:
        print(f"W&B: tracking turned off after an error ({type(e).__name__}: {e}); the run goes on")
        self.run = None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_unreachable() -> str:
    """Why the W&B server cannot be reached ("" when it can): one TCP connection, a few seconds at
    most, once per process. Without it an online run with no network waits about a minute in
    wandb.init (twice per pipeline) before giving up."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    if (host, port) not in _reachable:
        try:
            socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
            _reachable[host, port] = ""
        except OSError as e:
            _reachable[host, port] = f"{host}:{port} cannot be reached ({e.strerror or type(e).__name__})"
    return _reachable[host, port]


def init_tracking(cfg, run_dir: str | Path, name: str) -> Tracker:
    mode = os.environ.get("WANDB_MODE") or cfg.wandb_mode
    if mode in ("disabled", "off"):
        return Tracker(mode="disabled", message="W&B: disabled")
    try:
        import wandb
    except ImportError:
        return Tracker(message="W&B: wandb is not installed; tracking off (pip install wandb to enable)")
    note = ""
    if mode == "online" and not _has_api_key():
        mode, note = "offline", " (no API key found: logging offline; `wandb sync` uploads it later)"
    elif mode == "online" and (why := wandb_unreachable()):
        mode, note = "offline", (f" ({why}: no network? On Kaggle: Settings > Internet on. Logging offline; "
                                 "`wandb sync` uploads it later)")
    wandb_dir = Path(run_dir)   # wandb writes its files into <dir>/wandb
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        run = wandb.init(project=cfg.wandb_project, name=f"{name}-{Path(run_dir).name}", dir=str(wandb_dir),
                         config={**cfg.to_dict(), "model": name}, mode=mode, reinit="finish_previous",
                         settings=wandb.Settings(console="off", silent=True,
                                                 init_timeout=float(os.environ["WANDB_INIT_TIMEOUT"])))
    except Exception as e:
        return Tracker(message=f"W&B: could not start ({type(e).__name__}: {e}); tracking off, the run goes on")
    where = shown(Path(run.dir).parent, run_dir) if mode == "offline" else getattr(run, "url", "")
    return Tracker(run, mode, f"W&B: {mode}{note} -> {where}")
