"""A run directory and its layout, in one place.

    <run_dir>/
      data/                    prepared token files and meta.json (notebook 01)
      checkpoints/<arm>/       step_XXXXXXXX.pt, the newest few of each arm's training; the locks
      metrics/<arm>.json       every number of a finished training (and <arm>_samples.json)
      figures/  reports/  notebooks/  logs/  hf/<arm>/   figures, HTML, executed notebooks, kernel
                               logs, exports to transformers
      table1.csv  table2.csv

Everything that reads or writes a run's files asks a `RunFolder` for the path, the metrics, the latest
checkpoint or the trained model, so the layout is written down here and nowhere else.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .arms import ARM_NAMES, ARMS, build_model
from .checkpoint import latest_checkpoint, load_checkpoint
from .config import Config
from .errors import MissingRunFile
from .files import read_json, write_json
from .lock import folder_lock


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- the layout ----------------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def metrics_dir(self) -> Path:
        return self.path / "metrics"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def reports(self) -> Path:
        return self.path / "reports"

    @property
    def notebooks(self) -> Path:
        return self.path / "notebooks"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def checkpoints(self, arm: str) -> Path:
        return self.path / "checkpoints" / arm

    def export_dir(self, arm: str) -> Path:
        return self.path / "hf" / arm

    def metrics_path(self, arm: str) -> Path:
        return self.metrics_dir / f"{arm}.json"

    def table_path(self, table: str) -> Path:
        return self.path / f"{table}.csv"

    @contextmanager
    def lock(self, what: str, name: str):
        """One process at a time does `what` (a pipeline run, a sweep) in this folder."""
        with folder_lock(self.path, what, name):
            yield

    @contextmanager
    def training_lock(self, arm: str):
        """One process at a time trains `arm` here; a second gets a one-line RunLocked."""
        with folder_lock(self.path / "checkpoints", f"training {arm}", arm):
            yield

    # --- metrics ------------------------------------------------------------------------------------
    def has_metrics(self, arm: str) -> bool:
        return self.metrics_path(arm).exists()

    def trained_arms(self) -> list[str]:
        """The arms whose metrics are here, in the registry's order."""
        return [n for n in ARM_NAMES if self.has_metrics(n)]

    def write_metrics(self, metrics: dict) -> Path:
        """metrics/<arm>.json and <arm>_samples.json, each written whole or not at all."""
        name = metrics["model"]
        write_json(self.metrics_dir / f"{name}_samples.json", metrics["samples"])
        return write_json(self.metrics_path(name), {k: v for k, v in metrics.items() if k != "samples"})

    def load_metrics(self, arm: str) -> dict:
        path = self.metrics_path(arm)
        notebook = ARMS[arm].notebook if arm in ARMS else "the training notebook"
        if not path.exists():
            raise MissingRunFile(f"no metrics for {arm} at {path}. Fix: run notebook {notebook} with this run "
                                 "directory.")
        fix = f"run notebook {notebook} again with this run directory: it rebuilds the file from the final checkpoint"
        metrics = read_json(path, fix)
        samples = self.metrics_dir / f"{arm}_samples.json"
        metrics["samples"] = read_json(samples, fix) if samples.exists() else []
        return metrics

    # --- checkpoints and trained models ---------------------------------------------------------------
    def latest_checkpoint(self, arm: str) -> Path | None:
        return latest_checkpoint(self.checkpoints(arm))

    def load_trained_model(self, arm: str, cfg: Config | None = None,
                           device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model of `arm`'s latest checkpoint (its own settings unless `cfg` is given), in eval mode."""
        path = self.latest_checkpoint(arm)
        if path is None:
            raise MissingRunFile(f"no checkpoint of {arm} in {self.checkpoints(arm)}. Fix: train it first "
                                 f"(notebook {ARMS[arm].notebook if arm in ARMS else 'of that arm'}).")
        return load_model_checkpoint(path, cfg).to(device)


def load_model_checkpoint(path: str | Path, cfg: Config | None = None) -> torch.nn.Module:
    """The model a checkpoint file holds, built from its own settings unless `cfg` is given."""
    ck = load_checkpoint(path)
    model = build_model(ck["model_name"], cfg or Config.from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    return model.eval()
