"""Run the four notebooks end to end with papermill and render each to HTML with nbconvert.

    python -m llm_nb_utils.pipeline --preset smoke --out outputs/run-smoke
    python -m llm_nb_utils.pipeline --preset paper --set batch_size=16 --set dtype=float16

Every notebook gets the same parameters. Executed notebooks go to `<out>/notebooks/`, their HTML
to `<out>/reports/`. Re-running resumes: prepared data is reused, finished training is reloaded,
interrupted training continues from its last checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .config import ConfigError, make_config, parse_overrides, PRESETS
from .env import REPO, default_run_dir

NOTEBOOKS = ("01_data_prep", "02_gpt2_baseline", "03_moe_gqa", "04_compare_and_report")


class PipelineError(RuntimeError):
    pass


def render_html(notebook: Path, html: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter
    nb = nbformat.read(notebook, as_version=4)
    # The report shows the parameters papermill injected (the run's real values); the defaults
    # cell and the import-path boilerplate would only repeat or distract.
    injected = any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    hidden = {"remove_cell"} | ({"parameters"} if injected else set())
    nb.cells = [c for c in nb.cells if not hidden & set(c.metadata.get("tags", []))]
    exporter = HTMLExporter()
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nb)
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(body, encoding="utf-8")
    return html


def run_pipeline(params: dict, out: Path, notebooks=NOTEBOOKS, html: bool = True, kernel: str = "python3",
                 log=print) -> list[Path]:
    """Execute `notebooks` in order; stop at the first failure with the notebook, cell and error."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out = Path(out).resolve()
    params = {**params, "run_dir": str(out)}
    reports = []
    for name in notebooks:
        src = REPO / "notebooks" / f"{name}.ipynb"
        executed = out / "notebooks" / f"{name}.ipynb"
        executed.parent.mkdir(parents=True, exist_ok=True)
        log(f"[pipeline] {name}: running")
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(src), str(executed), parameters=params, kernel_name=kernel,
                                cwd=str(src.parent), log_output=True, progress_bar=False)
        except PapermillExecutionError as e:
            if html:
                render_html(executed, out / "reports" / f"{name}.html")
            raise PipelineError(
                f"notebook {name} failed in cell {e.cell_index} (execution count {e.exec_count}): "
                f"{e.ename}: {e.evalue}\nThe executed notebook, with the outputs up to the error, is "
                f"{executed}. Fix the cause and re-run the same command: finished work is reused.") from None
        log(f"[pipeline] {name}: done in {time.perf_counter() - t0:.1f} s")
        if html:
            reports.append(render_html(executed, out / "reports" / f"{name}.html"))
    return reports


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llm_nb_utils.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="paper: the study's configuration (GPU); small: a CPU run in minutes; smoke: tests")
    p.add_argument("--out", default="", help="run directory (default: outputs/run-<preset>)")
    p.add_argument("--source", default="local", choices=["local", "gutenberg"], help="corpus source")
    p.add_argument("--corpus-dir", default="", help="folder of .txt files (default: ../shared/corpus/pt-literature, "
                   "LLM_CORPUS_DIR, or a Kaggle input dataset)")
    p.add_argument("--gutenberg-mb", type=float, default=50.0, help="MB of text to download with --source gutenberg")
    p.add_argument("--split-method", default="proportional", choices=["proportional", "documents"])
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--max-steps", type=int, default=0, help="cap on training steps (0: the preset's value)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set batch_size=16 --set dtype=float16 (repeatable)")
    p.add_argument("--wandb-mode", default="offline", choices=["online", "offline", "disabled"])
    p.add_argument("--no-resume", action="store_true", help="retrain even if checkpoints or results exist")
    p.add_argument("--allow-undecodable", action="store_true", help="skip files that are not valid UTF-8")
    p.add_argument("--only", nargs="+", choices=NOTEBOOKS, help="run only these notebooks (in order)")
    p.add_argument("--no-html", action="store_true", help="do not render HTML reports")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    p.add_argument("--export-hf", action="store_true",
                   help="also export both models to <out>/hf/ (transformers format; notebook 04 does it too)")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        overrides = parse_overrides(args.set)
        make_config(args.preset, overrides, seed=args.seed, split_method=args.split_method,
                    **({"max_steps": args.max_steps} if args.max_steps else {}))   # fail before any work
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_run_dir(args.preset)
    params = dict(preset=args.preset, overrides=overrides, corpus_source=args.source, corpus_dir=args.corpus_dir,
                  gutenberg_target_mb=args.gutenberg_mb, split_method=args.split_method, seed=args.seed,
                  allow_undecodable=args.allow_undecodable, wandb_mode=args.wandb_mode,
                  resume=not args.no_resume, max_steps=args.max_steps, progress=False)
    t0 = time.perf_counter()
    try:
        reports = run_pipeline(params, out, args.only or NOTEBOOKS, html=not args.no_html, kernel=args.kernel)
    except PipelineError as e:
        print(f"\n[pipeline] FAILED: {e}", file=sys.stderr)
        return 1
    if args.export_hf:
        from .export_hf import export_run
        for name in ("gpt2", "moe_gqa"):
            print(f"[pipeline] {name} exported to {export_run(out, name)}")
    print(f"\n[pipeline] finished in {time.perf_counter() - t0:.1f} s. Run directory: {out.resolve()}")
    for r in reports:
        print(f"  report: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
