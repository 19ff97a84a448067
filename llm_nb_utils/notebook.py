"""The few lines every notebook starts with: parameters -> a validated config and a run directory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import Config, changed_settings, make_config, parse_overrides_value, resolve_preset
from .env import REPO, default_run_dir, platform
from .files import check_writable
from .runfolder import RunFolder


@dataclass
class NotebookRun:
    cfg: Config
    run_dir: Path

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    @property
    def data_dir(self) -> Path:
        return self.folder.data

    @property
    def figures_dir(self) -> Path:
        return self.folder.figures


def _shown_run_dir(path: Path) -> str:
    """The run directory as the report shows it: relative to the working directory or the clone when
    inside one, else its last two parts (a report never carries a machine's absolute paths)."""
    for base in (Path.cwd(), REPO):
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return f".../{path.parent.name}/{path.name}"


def setup(preset: str, overrides: dict | None = None, run_dir: str = "", **extra) -> NotebookRun:
    """Validate the parameters before any work, make the run directory, print what will run.

    `overrides` is a mapping or its JSON/YAML text; `extra` holds notebook parameters that are also
    settings (seed, split_method, max_steps...), where None or "" leaves the preset's value.
    """
    preset, why = resolve_preset(preset)
    overrides = parse_overrides_value(overrides)
    values = {**overrides, **{k: v for k, v in extra.items() if v not in (None, "")}}
    if values.get("max_steps") == 0 and "max_steps" not in overrides:
        values.pop("max_steps")   # 0 in a notebook's parameters means "the preset's value"
    cfg = make_config(preset, values)
    path = Path(run_dir) if run_dir else default_run_dir(preset)
    check_writable(path)          # a read-only folder (a Kaggle input dataset) fails here, in one line
    changed = changed_settings(cfg)
    print(f"platform: {platform()} | preset: {preset} ({why}) | changed settings: "
          f"{json.dumps(changed) if changed else 'none'}")
    print(f"run directory: {_shown_run_dir(path)}")
    return NotebookRun(cfg, path)


def prepare_corpus(run: NotebookRun, corpus_source: str = "auto", corpus_dir: str = "",
                   gutenberg_target_mb: float = 50.0, allow_undecodable: bool = False) -> dict:
    """Find the corpus (downloading it from Project Gutenberg where no local one is found) and write
    the run's token files, or reuse them; returns their metadata. Notebooks 01 and 06 both start here."""
    from .env import resolve_corpus
    from .gutenberg import download_portuguese_corpus
    from .prepare import prepare_data
    source, source_dir, why = resolve_corpus(corpus_source, corpus_dir)
    print(f"corpus: {source} ({why})")
    if source == "gutenberg":
        source_dir = download_portuguese_corpus(run.run_dir / "gutenberg", target_mb=gutenberg_target_mb)
    return prepare_data(source_dir, run.data_dir, split_method=run.cfg.split_method, ratios=run.cfg.split_ratios,
                        seed=run.cfg.seed, allow_undecodable=allow_undecodable, source=source)
