"""Run the four notebooks end to end with papermill and render each to HTML with nbconvert.

    python -m llm_nb_utils.pipeline                  # the preset this machine can run (auto)
    python -m llm_nb_utils.pipeline --preset smoke --out outputs/run-smoke
    python -m llm_nb_utils.pipeline --preset paper --set batch_size=16 --set dtype=float16

Every notebook gets the same parameters. Executed notebooks go to `<out>/notebooks/`, their HTML
to `<out>/reports/`, each kernel's own log lines to `<out>/logs/`. Re-running resumes: prepared
data is reused, finished training is reloaded, interrupted training continues from its last
checkpoint. Ctrl-C asks the running notebook to save its state and stop (exit status 130).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

from .config import ConfigError, config_arguments, config_from_arguments
from .device import DeviceError, resolve_device
from .distributed import Dist, resolve_gpus
from .env import NOTEBOOK_DIR, REPO, default_run_dir
from .files import StorageError, check_writable, repository_of, without_machine_paths, write_atomic
from .lock import RunLocked
from .errors import SuiteError
from .runfolder import RunFolder
from .arms import ARM_NAMES, ARMS, parse_arms

NOTEBOOKS = ("01_data_prep", *(a.notebook for a in ARMS.values()), "05_compare_and_report")
EXIT_INTERRUPTED = 130    # what a shell reports for a program stopped by Ctrl-C


class PipelineError(SuiteError, RuntimeError):
    """A notebook of the pipeline failed or stopped; the message names it and where its output is."""


class PipelineInterrupted(PipelineError):
    pass


class Interrupts:
    """Ctrl-C while the pipeline runs is passed on to the kernel running the notebook.

    The kernel runs in a session of its own (jupyter_client starts it so), so a terminal's Ctrl-C
    never reaches it; without this handler the pipeline would die in asyncio and take the kernel
    down before training could save its state. The first Ctrl-C interrupts the kernel (training
    saves a checkpoint and stops between two steps); a second one stops the pipeline at once.
    """

    def __init__(self):
        self.hit = False
        self.kernel_pgid: int | None = None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt("second Ctrl-C")
        self.hit = True
        print("\n[pipeline] Ctrl-C: the running notebook saves its state and stops "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        if self.kernel_pgid:
            try:
                os.killpg(self.kernel_pgid, signal.SIGINT)
            except ProcessLookupError:
                pass


def _kernel_manager_class(kernel_log: Path, interrupts: Interrupts):
    """jupyter_client's kernel manager, but the kernel's own stdout/stderr (its startup and shutdown
    messages, C-level warnings) go to `kernel_log`, and its process group is told to `interrupts`."""
    from jupyter_client import AsyncKernelManager

    class PipelineKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            with open(kernel_log, "ab") as f:      # the kernel keeps its own copy of the descriptor
                await super()._async_launch_kernel(kernel_cmd, **{**kw, "stdout": f, "stderr": f})
            interrupts.kernel_pgid = self.provisioner.pgid

    return PipelineKernelManager


def _images_with_alt_text(nb) -> None:
    """A PNG output whose metadata carries alt text (`figures.show`) becomes an <img alt=...>: the
    lab template nbconvert uses writes no alt attribute of its own."""
    import html as html_lib
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            alt = out.get("metadata", {}).get("image/png", {}).get("alt") or out.get("metadata", {}).get("alt")
            if alt and "image/png" in out.get("data", {}):
                img = f'<img src="data:image/png;base64,{out.data["image/png"].strip()}" alt="{html_lib.escape(alt)}">'
                out.data = {"text/html": img}
                out.metadata = {}


def _shorten_long_streams(nb, source: str, head: int = 8, tail: int = 6, most: int = 30) -> None:
    """A cell's printed text over `most` lines (a long run's progress lines) keeps its first `head`
    and last `tail` lines in the report, and says where the rest is: the curves show the same run,
    and a reader should not scroll past hundreds of log lines to reach them."""
    for cell in nb.cells:
        merged = []        # consecutive prints to one stream, as a reader sees them: one block
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            lines = out.text.splitlines(keepends=True) if out.output_type == "stream" else []
            if len(lines) > most:
                left_out = len(lines) - head - tail
                out.text = "".join([*lines[:head], f"[... {left_out:,} lines left out of this report; "
                                    f"{source} has them all ...]\n", *lines[-tail:]])
        if "outputs" in cell:
            cell.outputs = merged


# Tables in the reports: numbers right-aligned (digits line up), words left-aligned (they read).
_WORDS = re.compile(r"[^\W\d_]{4,}")
_TABLE = re.compile(r'<table border="1" class="dataframe">.*?</table>', re.S)
_ROW = re.compile(r"<tr[^>]*>.*?</tr>", re.S)
_CELL = re.compile(r"<(td|th)([^>]*)>(.*?)</\1>", re.S)
_TEXT_CSS = "<style>" + ", ".join(f".jp-RenderedHTMLCommon table.dataframe {c}" for c in (
    "td.text", "th.text", "tbody th")) + " { text-align: left; }</style>"


def _is_text(cell: str) -> bool:
    return bool(_WORDS.search(re.sub(r"<[^>]+>", "", cell)))


def _align_table(table: str) -> str:
    """Mark as text each column most of whose cells hold words (a run of four letters or more),
    its header included; the row labels (th in the body) are always text."""
    body_rows = [list(_CELL.finditer(r)) for r in _ROW.findall(table.split("<tbody>")[-1])]
    votes: dict[int, list[bool]] = {}
    for cells in body_rows:
        for i, c in enumerate(c for c in cells if c.group(1) == "td"):
            votes.setdefault(i, []).append(_is_text(c.group(3)))
    text_cols = {i for i, v in votes.items() if sum(v) * 2 > len(v)}
    n_index = sum(c.group(1) == "th" for c in body_rows[0]) if body_rows else 0

    def mark(row: str, header: bool) -> str:
        if header and "colspan" in row:
            return row                        # a two-level header: leave it as pandas drew it
        col = -n_index if header else 0

        def one(m):
            nonlocal col
            i = col
            col += 1 if (header or m.group(1) == "td") else 0
            return (f'<{m.group(1)} class="text"{m.group(2)}>{m.group(3)}</{m.group(1)}>'
                    if i in text_cols and (header or m.group(1) == "td") else m.group(0))
        return _CELL.sub(one, row)
    head, _, body = table.partition("<tbody>")
    return (_ROW.sub(lambda r: mark(r.group(0), True), head) + ("<tbody>" if body else "")
            + _ROW.sub(lambda r: mark(r.group(0), False), body))


def _align_text_cells(html: str) -> str:
    return _TABLE.sub(lambda t: _align_table(t.group(0)), html).replace("</head>", _TEXT_CSS + "</head>", 1)


def render_html(notebook: Path, html: Path) -> Path:
    """The executed notebook as a report: no parameters cells (a settings line says what ran), no
    set-up cell, figures with their alt text, long printed logs shortened, no prompts."""
    import nbformat
    from nbconvert import HTMLExporter
    nb = nbformat.read(notebook, as_version=4)
    hidden = {"remove_cell", "parameters", "injected-parameters"}
    nb.cells = [c for c in nb.cells if not hidden & set(c.metadata.get("tags", []))]
    _images_with_alt_text(nb)
    _shorten_long_streams(nb, f"the executed notebook notebooks/{notebook.name}")
    exporter = HTMLExporter()
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nb)
    return write_atomic(html, _align_text_cells(body))


def _keep(partial: Path, executed: Path, kernel_log: Path, folder: RunFolder) -> None:
    """The executed notebook under its final name, it and its kernel's log naming the package's
    and the run folder's repositories relatively (papermill records absolute paths)."""
    os.replace(partial, executed)
    without_machine_paths([executed, kernel_log], [REPO, repository_of(folder.path)])


def run_pipeline(params: dict, out: Path, notebooks=NOTEBOOKS, html: bool = True, kernel: str = "python3",
                 log=print, verbose: bool = False, stdout=None, stderr=None) -> list[Path]:
    """Execute `notebooks` in order; stop at the first failure with the notebook, cell and error.

    What the notebooks print streams as it comes to `stdout`/`stderr` (this process's, unless other
    open files are given). Raises PipelineInterrupted after a Ctrl-C, once the interrupted notebook
    is saved and rendered.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    folder = RunFolder(Path(out).resolve())
    params = {**params, "run_dir": str(folder.path)}
    reports = []
    with folder.lock("a pipeline run", "pipeline"), Interrupts() as interrupts:
        for name in notebooks:
            src = NOTEBOOK_DIR / f"{name}.ipynb"
            executed = folder.notebooks / f"{name}.ipynb"
            kernel_log = folder.logs / f"{name}.kernel.log"
            for d in (executed.parent, kernel_log.parent):
                d.mkdir(parents=True, exist_ok=True)
            log(f"[pipeline] {name}: running")
            t0 = time.perf_counter()
            quiet = {} if verbose else {"kernel_manager_class": _kernel_manager_class(kernel_log, interrupts)}
            # papermill saves as it goes; the final name only when done (papermill wants .ipynb)
            partial = executed.with_name(f".{executed.stem}.{os.getpid()}.partial.ipynb")
            try:
                pm.execute_notebook(str(src), str(partial), parameters=params, kernel_name=kernel,
                                    cwd=str(src.parent), progress_bar=False, log_output=False,
                                    stdout_file=stdout or sys.stdout, stderr_file=stderr or sys.stderr, **quiet)
            except PapermillExecutionError as e:
                _keep(partial, executed, kernel_log, folder)
                if html:
                    render_html(executed, folder.reports / f"{name}.html")
                if interrupts.hit or e.ename in ("KeyboardInterrupt", "TrainingInterrupted", "PipelineInterrupted"):
                    raise PipelineInterrupted(f"{name} was interrupted" + (f": {e.evalue}" if e.evalue else "")) from None
                raise PipelineError(
                    f"notebook {name} failed in cell {e.cell_index} (execution count {e.exec_count}): "
                    f"{e.ename}: {e.evalue}\nThe executed notebook, with the outputs up to the error, is "
                    f"{executed}. Fix the cause and re-run the same command: finished work is reused.") from None
            except Exception as e:        # the kernel died (killed, out of memory) or could not start
                if partial.exists():
                    _keep(partial, executed, kernel_log, folder)
                raise PipelineError(f"notebook {name} stopped: {type(e).__name__}: {e}. Re-run the same "
                                    "command: finished work is reused.") from None
            finally:
                interrupts.kernel_pgid = None
            _keep(partial, executed, kernel_log, folder)
            log(f"[pipeline] {name}: done in {time.perf_counter() - t0:.1f} s")
            if html:
                reports.append(render_html(executed, folder.reports / f"{name}.html"))
            if interrupts.hit:
                raise PipelineInterrupted(f"stopped after {name}, which had finished")
    return reports


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: the same one, without --no-resume."""
    return shlex.join(["python", "-m", "llm_nb_utils.pipeline", *(a for a in argv if a != "--no-resume")])


def run_from_cli(params: dict, out: Path, notebooks, resume: str, tag: str, **kw) -> tuple[int | None, list[Path]]:
    """run_pipeline for a command line: (None, reports) when it finished, else (exit status, []) after
    one message saying what happened and, for an interrupt, the command that continues."""
    try:
        return None, run_pipeline(params, out, notebooks, **kw)
    except PipelineInterrupted as e:
        print(f"\n[{tag}] {e}\n[{tag}] the executed notebooks and their reports are in {out.resolve()}"
              f"\n[{tag}] to continue where it stopped: {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED, []
    except KeyboardInterrupt:
        print(f"\n[{tag}] stopped at once (second Ctrl-C): work since the last checkpoint is lost. "
              f"To continue from it: {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED, []
    except RunLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, []
    except PipelineError as e:
        print(f"\n[{tag}] FAILED: {e}", file=sys.stderr)
        return 1, []


def estimate_arms(cfg, arms) -> str:
    """What each arm's training will cost here: a few steps timed on random tokens, times max_steps
    (evaluation and the notebooks' start come on top)."""
    from .progress import format_duration
    from .steptime import seconds_per_step
    costs = [f"{n} ~{format_duration(seconds_per_step(n, cfg) * cfg.max_steps)}" for n in arms]
    return (f"[pipeline] training {cfg.max_steps:,} steps per arm, estimated from 3 timed steps each: "
            + ", ".join(costs) + " (evaluation and notebook start-up come on top)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m llm_nb_utils.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    config_arguments(p)
    p.add_argument("--out", default="", help="run directory (default: outputs/run-<preset>)")
    p.add_argument("--source", default="auto", choices=["auto", "local", "gutenberg"],
                   help="corpus source (auto: a local corpus if one is found, else a Gutenberg download)")
    p.add_argument("--corpus-dir", default="", help="folder of .txt files (default: LLM_CORPUS_DIR, a Kaggle "
                   "input dataset, or ../shared/corpus/pt-literature)")
    p.add_argument("--gutenberg-mb", type=float, default=50.0, help="MB of text to download from Gutenberg")
    p.add_argument("--split-method", default=None, choices=["proportional", "documents"],
                   help="proportional (the preset's, as in the study) or documents")
    p.add_argument("--gpus", default="auto", help="training processes: auto (every visible CUDA GPU, else 1) or a "
                   "number; above 1, torchrun with DDP (on a CPU, with --set device=cpu: gloo, for testing)")
    p.add_argument("--wandb-mode", default="offline", choices=["online", "offline", "disabled"])
    p.add_argument("--no-resume", action="store_true", help="retrain even if checkpoints or results exist")
    p.add_argument("--allow-undecodable", action="store_true", help="skip files that are not valid UTF-8")
    p.add_argument("--arms", nargs="+", default=["all"], metavar="ARM",
                   help=f"the arms to train and compare (default all: {', '.join(ARM_NAMES)}); e.g. --arms gpt2 moe_gqa "
                        "for the study's two")
    p.add_argument("--only", nargs="+", choices=NOTEBOOKS, help="run only these notebooks (in order)")
    p.add_argument("--no-html", action="store_true", help="do not render HTML reports")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    p.add_argument("--export-hf", action="store_true",
                   help="also export the trained models to <out>/hf/ (transformers format; notebook 05 does it too)")
    p.add_argument("--verbose", action="store_true",
                   help="papermill's cell-by-cell log, and the kernels' own messages on the terminal")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        preset, why, overrides, cfg = config_from_arguments(args)    # fail before any work
        if args.preset == "auto":
            print(f"[pipeline] preset: {preset} ({why}); choose another with --preset paper, small or smoke")
        arms = parse_arms(args.arms)
        if len(arms) < 2 and "05_compare_and_report" in (args.only or NOTEBOOKS):
            raise ConfigError(f"--arms {' '.join(args.arms)}: the comparison needs at least two arms (of "
                              f"{', '.join(ARM_NAMES)}). Fix: name two or more, leave --arms out for all, or "
                              "leave the comparison out with --only (e.g. --only 01_data_prep "
                              f"{ARMS[arms[0]].notebook}).")
        resolve_device(cfg.device)
        Dist(world_size=resolve_gpus(args.gpus, cfg.device)).check_batch(cfg.batch_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DeviceError as e:
        print(f"error: the {preset} preset trains on device={cfg.device!r}, which is not usable here: "
              f"{str(e).split('. Fix:')[0]}. Fix: --preset small for a CPU run, or --set device=cpu to run "
              f"the {preset} preset on this CPU anyway (it prints an estimate after its first steps).",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_run_dir(preset)
    try:
        check_writable(out)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = dict(preset=preset, overrides=overrides, corpus_source=args.source, corpus_dir=args.corpus_dir,
                  gutenberg_target_mb=args.gutenberg_mb, split_method=args.split_method, seed=args.seed,
                  allow_undecodable=args.allow_undecodable, wandb_mode=args.wandb_mode,
                  resume=not args.no_resume, max_steps=args.max_steps, progress=False, gpus=args.gpus)
    t0 = time.perf_counter()
    if cfg.max_steps and not args.only:
        print(estimate_arms(cfg, arms))
    skipped = {ARMS[n].notebook for n in ARM_NAMES if n not in arms}
    status, reports = run_from_cli(params, out, [n for n in args.only or NOTEBOOKS if n not in skipped],
                                   resume_command(argv), "pipeline",
                                   html=not args.no_html, kernel=args.kernel, verbose=args.verbose)
    if status is not None:
        return status
    if args.export_hf:
        from .export_hf import export_run
        for name in arms:
            print(f"[pipeline] {name} exported to {export_run(out, name)}")
    print(f"\n[pipeline] finished in {time.perf_counter() - t0:.1f} s. Run directory: {out.resolve()}")
    for r in reports:
        print(f"  report: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
