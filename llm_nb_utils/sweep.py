"""A sweep: many training runs at one budget, each a papermill execution of a training notebook.

    python -m llm_nb_utils.sweep --preset small --grid seeds --seeds 3 --max-steps 300
    python -m llm_nb_utils.sweep --preset small --grid moe --experts 2 4 8 --per-token 1 2

Two grids answer the two questions one run per model cannot:
- ``seeds``: every arm (GPT-2, Dense-GQA, MoE-GQA; `--arms` chooses) x S seeds. Is MoE-GQA's lower
  loss real, and is it the architecture or the experts? (`--dense-iso-total` adds a Dense-GQA as large
  as MoE-GQA in total.)
- ``moe``: ``num_experts`` x ``num_experts_per_token`` x S seeds, GPT-2 and Dense-GQA as reference
  rows (the search over MoE settings the study left as future work).

Every point trains for the same budget (steps, or tokens turned into steps) on the same prepared data.
A seed sets both the initialisation and the order of the training windows, so the runs of one seed
see the same batches: their differences are measured pair by pair.

The sweep folder holds `data/` (prepared once), `sweep.json` (the budget and base settings) and
`runs/<point>/`, a run directory per point with its executed notebook, metrics and checkpoints. A
sweep that stops (Ctrl-C, a session cut off) is continued by the same command: finished points are
skipped, an interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .arms import ARMS, REFERENCE, parse_arms
from .config import Config, ConfigError, changed_settings, make_config
from .env import REPO
from . import langeval
from .files import DamagedFileError, StorageError, read_json, repository_of, without_machine_paths, write_json
from .progress import format_duration
from .runfolder import RunFolder
from .steptime import seconds_per_step

KAGGLE_SESSION_HOURS = 12.0
MOE_KEYS = ("num_experts", "num_experts_per_token", "moe_intermediate_size")
DESIGN_KEYS = (*MOE_KEYS, "dense_ff_width")       # what a point may change besides its seed


@dataclass(frozen=True)
class Point:
    """One training run of the sweep. Points of an arm with experts carry their expert settings;
    a Dense-GQA point its feed-forward width when it is not the default (the iso-total variant)."""
    model: str
    seed: int
    num_experts: int = 0
    num_experts_per_token: int = 0
    moe_intermediate_size: int = 0
    dense_ff_width: int = 0

    @property
    def design(self) -> str:
        """The point without its seed: what the sweep's table has one row for. MoE designs read
        'E x k (w)': E experts, k per token, each w wide."""
        label = ARMS[self.model].label.replace(" baseline", "")
        if self.num_experts:
            return f"{label} {self.num_experts}x{self.num_experts_per_token} ({self.moe_intermediate_size})"
        return f"{label} (width {self.dense_ff_width})" if self.dense_ff_width else label

    @property
    def name(self) -> str:
        if self.num_experts:
            return (f"{self.model}-e{self.num_experts}k{self.num_experts_per_token}"
                    f"-w{self.moe_intermediate_size}-seed{self.seed}")
        return f"{self.model}{f'-w{self.dense_ff_width}' if self.dense_ff_width else ''}-seed{self.seed}"

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in DESIGN_KEYS if getattr(self, k)}


def seed_list(base_seed: int, n: int) -> list[int]:
    if n < 1:
        raise ConfigError(f"seeds must be at least 1 (got {n})")
    return [base_seed + i for i in range(n)]


def moe_width(cfg: Config, per_token: int, keep_active: bool) -> int:
    """The expert width: the preset's, or scaled so that per_token x width (the feed-forward work a
    token gets) stays the preset's num_experts_per_token x moe_intermediate_size."""
    if not keep_active:
        return cfg.moe_intermediate_size
    active = cfg.num_experts_per_token * cfg.moe_intermediate_size
    if active % per_token:
        raise ConfigError(f"keep_active_params: {active} (num_experts_per_token x moe_intermediate_size) is not "
                          f"divisible by {per_token} experts per token. Fix: choose per-token counts that divide it.")
    return active // per_token


def _arm_point(cfg: Config, name: str, seed: int) -> Point:
    """An arm at the preset's settings; an arm with experts carries them."""
    if ARMS[name].has_experts:
        return Point(name, seed, cfg.num_experts, cfg.num_experts_per_token, cfg.moe_intermediate_size)
    return Point(name, seed)


def grid_points(cfg: Config, grid: str, seeds: list[int], experts=(2, 4, 8), per_token=(1, 2),
                keep_active: bool = False, arms=None, dense_iso_total: bool = False) -> list[Point]:
    """The points of a grid, in the registry's order of arms and seed-major (a cut-off sweep has whole
    seeds done). `arms` chooses the arms (default all); in the moe grid the arms without experts are
    the reference rows."""
    chosen = parse_arms(arms)
    if grid == "seeds":
        designs = [_arm_point(cfg, n, 0) for n in chosen]
    elif grid == "moe":
        bad = [(e, k) for e in experts for k in per_token if k > e or e < 1 or k < 1]
        if bad:
            raise ConfigError(f"MoE grid: experts per token must be between 1 and the number of experts (got "
                              f"{', '.join(f'{e} experts x {k} per token' for e, k in bad)}). Fix: drop those values.")
        designs = [_arm_point(cfg, n, 0) for n in chosen if not ARMS[n].has_experts]
        designs += [Point(n, 0, e, k, moe_width(cfg, k, keep_active))
                    for n in chosen if ARMS[n].has_experts for e in experts for k in per_token]
    else:
        raise ConfigError(f"grid must be 'seeds' or 'moe' (got {grid!r})")
    if dense_iso_total:      # the dense control as large as the MoE in total parameters
        dense = [d for d in designs if not ARMS[d.model].has_experts and d.model != REFERENCE]
        if not dense:
            raise ConfigError("dense_iso_total needs a dense arm other than the reference among the arms. "
                              "Fix: include dense_gqa in --arms.")
        at = designs.index(dense[0]) + 1
        designs.insert(at, Point(dense[0].model, 0, dense_ff_width=cfg.num_experts * cfg.moe_intermediate_size))
    return [Point(d.model, s, d.num_experts, d.num_experts_per_token, d.moe_intermediate_size, d.dense_ff_width)
            for s in seeds for d in designs]


def budget_steps(cfg: Config, tokens: int = 0) -> int:
    """Optimizer steps per run: `tokens` turned into whole steps, else the config's max_steps."""
    if tokens:
        return math.ceil(tokens / (cfg.batch_size * cfg.context_length))
    if not cfg.max_steps:
        raise ConfigError(f"a sweep needs a budget per run, and the {cfg.preset} preset trains for whole epochs "
                          "(max_steps=0). Fix: give max_steps (steps per run) or budget_tokens.")
    return cfg.max_steps


class Sweep:
    """The plan of a sweep in a folder: base settings, budget, points; what is done; what it costs."""

    def __init__(self, cfg: Config, folder: Path, points: list[Point], steps: int, log=print):
        self.cfg, self.folder, self.points, self.steps, self.log = cfg, Path(folder), points, steps, log
        self.step_s: dict[str, float] = {}      # measured seconds per training step, by design

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.cfg.batch_size * self.cfg.context_length

    def point_config(self, p: Point) -> Config:
        return self.cfg.replace(seed=p.seed, max_steps=self.steps, **p.overrides())

    def run_dir(self, p: Point) -> Path:
        return self.folder / "runs" / p.name

    def check_plan(self) -> None:
        """A sweep folder keeps one budget and one set of base settings: points trained otherwise
        would not compare. More seeds or grid points may be added."""
        plan = {"preset": self.cfg.preset, "steps": self.steps,
                "settings": {k: v for k, v in changed_settings(self.cfg).items()
                             if k not in ("seed", "max_steps", *DESIGN_KEYS)}}
        path = self.folder / "sweep.json"
        if path.exists():
            old = read_json(path, "delete sweep.json to start the sweep over")
            if old != plan:
                raise ConfigError(
                    f"{self.folder} holds a sweep with other settings (budget {old.get('steps')} steps, preset "
                    f"{old.get('preset')}, settings {old.get('settings')}; now {self.steps} steps, preset "
                    f"{self.cfg.preset}, settings {plan['settings']}). Fix: the same settings to continue it, or "
                    "another run_dir for a new sweep.")
        else:
            write_json(path, plan)

    def finished(self, p: Point) -> dict | None:
        """The metrics of a point trained to the full budget, or None."""
        path = RunFolder(self.run_dir(p)).metrics_path(p.model)
        if not path.exists():
            return None
        try:
            m = read_json(path, "")
        except (DamagedFileError, OSError):
            return None                           # damaged: the point's notebook rebuilds it
        return m if m.get("steps") == self.steps and m.get("config", {}).get("seed") == p.seed else None

    def plan_table(self) -> pd.DataFrame:
        return pd.DataFrame([{"run": p.name, "model": p.design, "seed": p.seed,
                              "status": "done" if self.finished(p) else "to run"} for p in self.points])

    # --- the cost, before starting -----------------------------------------------------------------
    def measure(self, points: list[Point], steps: int = 3) -> None:
        """Seconds per training step of the designs of `points`, from a few steps on random tokens."""
        for p in {p.design: p for p in points}.values():
            if p.design not in self.step_s:
                self.step_s[p.design] = seconds_per_step(p.model, self.point_config(p), steps)

    def run_seconds(self, p: Point) -> float:
        """Training plus evaluation (an evaluation batch counted as a third of a training step)."""
        cfg, step = self.cfg, self.step_s[p.design]
        evals = self.steps // cfg.eval_freq + 1
        test_windows = cfg.test_windows if cfg.eval_protocol == "sampled" and cfg.test_windows else self.test_windows()
        eval_batches = evals * 2 * cfg.eval_iter + test_windows / cfg.batch_size
        return step * (self.steps + eval_batches / 3)

    def test_windows(self) -> int:
        """Windows in the prepared test split (0 before the data is prepared)."""
        from .prepare import load_meta
        try:
            tokens = load_meta(RunFolder(self.folder).data)["splits"]["test"]["tokens"]
        except Exception:
            return 0
        return max(1, tokens // self.cfg.stride)

    def estimate(self, max_hours: float = KAGGLE_SESSION_HOURS) -> float:
        """Print the runs, the time per run and in total; warn past `max_hours` or a Kaggle session.
        Each estimate is kept in estimates.json, so that a later look at the sweep still shows its plan."""
        todo = [p for p in self.points if not self.finished(p)]
        self.log(f"sweep: {len(self.points)} runs of {self.steps:,} steps ({self.tokens_per_run:,} training tokens) "
                 f"each; {len(self.points) - len(todo)} done, {len(todo)} to run")
        earlier = self.earlier_estimates()
        total = 0.0
        if todo:
            self.measure(todo)
            total = sum(self.run_seconds(p) for p in todo)
            for design, s in self.step_s.items():
                p = next(p for p in self.points if p.design == design)
                self.log(f"  {design}: {s:.3f} s/step measured -> about {format_duration(self.run_seconds(p))} per run")
            self.log(f"  estimated total: {format_duration(total)} (training and evaluation, plus each run's "
                     "notebook start: a new kernel and its imports)")
            self.keep_estimate(len(todo), total)
        for e in earlier:
            per_design = ", ".join(f"{d} {s:.3f} s/step" for d, s in e["s_per_step"].items())
            self.log(f"  estimated {e['when']} on {e['device']}, {e['to_run']} to run: "
                     f"{format_duration(e['total_s'])} ({per_design})")
        for limit, what in ((max_hours, f"max_hours={max_hours:g}"), (KAGGLE_SESSION_HOURS, "a Kaggle session (12 h)")):
            if total > limit * 3600:
                self.log(f"warning: the estimated {format_duration(total)} exceed {what}. The sweep stops cleanly "
                         "when cut off and the same command continues it; or lower the budget or the seeds.")
                break
        return total

    def earlier_estimates(self) -> list[dict]:
        path = self.folder / "estimates.json"
        return read_json(path, "delete estimates.json (it only keeps earlier estimates)") if path.exists() else []

    def keep_estimate(self, to_run: int, total_s: float) -> None:
        from .device import resolve_device, resolve_precision
        device = resolve_precision(self.cfg.dtype, resolve_device(self.cfg.device), self.cfg.force_dtype).device_name
        record = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
                  "to_run": to_run, "total_s": round(total_s), "s_per_step": {d: round(s, 4) for d, s in self.step_s.items()}}
        write_json(self.folder / "estimates.json", [*self.earlier_estimates(), record])

    # --- running -------------------------------------------------------------------------------------
    def link_data(self, p: Point) -> None:
        """Every point trains on the sweep's one prepared data folder."""
        run = RunFolder(self.run_dir(p))
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.data.exists():
            run.data.symlink_to(Path("..") / ".." / RunFolder(self.folder).data.name, target_is_directory=True)

    def run(self, wandb_mode: str = "offline", kernel: str = "python3", gpus="auto") -> list[str]:
        """Train every point not yet done, one papermill execution each. A failed point is reported
        and the sweep goes on; an interrupt stops it (PipelineInterrupted). Returns the failures."""
        from .pipeline import PipelineError, PipelineInterrupted, run_pipeline
        failures = []
        for i, p in enumerate(self.points, 1):
            head = f"[sweep] {i}/{len(self.points)} {p.name}"
            if done := self.finished(p):
                self.log(f"{head}: done earlier, skipped (test loss {done['test_loss']:.4f}, "
                         f"{format_duration(done['train_time_s'])} of training)")
                continue
            self.link_data(p)
            run = self.run_dir(p)
            params = dict(preset=self.cfg.preset, overrides={**changed_settings(self.cfg), **p.overrides()},
                          seed=p.seed, max_steps=self.steps, wandb_mode=wandb_mode, resume=True, progress=False,
                          gpus=gpus)
            t0 = time.perf_counter()
            logs = RunFolder(run).logs
            logs.mkdir(parents=True, exist_ok=True)
            with open(logs / "output.log", "a") as out:
                try:
                    run_pipeline(params, run, (ARMS[p.model].notebook,), html=False, kernel=kernel,
                                 log=lambda *_: None, stdout=out, stderr=out)
                except PipelineInterrupted:
                    self.log(f"{head}: interrupted; its state is saved, and the same command continues the sweep")
                    raise
                except PipelineError as e:
                    failures.append(f"{p.name}: {str(e).splitlines()[0]}")
                    self.log(f"{head}: FAILED ({str(e).splitlines()[0]}); its log: runs/{p.name}/logs/output.log. "
                             "The sweep goes on; a re-run retries it.")
                    continue
            without_machine_paths([logs / "output.log"], [REPO, repository_of(run)])
            m = self.finished(p)
            est = f" (estimated {format_duration(self.run_seconds(p))})" if p.design in self.step_s else ""
            self.log(f"{head}: test loss {m['test_loss']:.4f} in {format_duration(time.perf_counter() - t0)}{est}")
        return failures

    # --- results -------------------------------------------------------------------------------------
    def results(self) -> tuple[pd.DataFrame, dict[str, list]]:
        """One row per finished point, and each point's loss history by name."""
        rows, histories = [], {}
        for p in self.points:
            m = self.finished(p)
            if m is None:
                continue
            histories[p.name] = m["history"]
            rows.append({"run": p.name, "model": p.model, "design": p.design, "seed": p.seed,
                         "num_experts": p.num_experts, "num_experts_per_token": p.num_experts_per_token,
                         "test_loss": m["test_loss"], "test_perplexity": m["test_perplexity"],
                         "test_bits_per_byte": m.get("test_bits_per_byte", math.nan),
                         "tokens_per_s": m["tokens_per_s"], "peak_memory_mb": m["peak_memory_mb"],
                         "total_params": m["total_params"], "active_params": m["active_params"],
                         "flops_per_token": m["flops_per_token"],
                         "training_flops": m["flops_per_token"] * m["tokens_seen"],
                         "train_time_s": m["train_time_s"], "steps": m["steps"], "tokens_seen": m["tokens_seen"],
                         "device_name": m["device_name"], "dtype": m["dtype"],
                         "language_score": 100 * m["language"]["combined"] if m.get("language") else math.nan,
                         **{f"lang_{t}": 100 * m["language"]["tasks"][t]["accuracy"]
                            if m.get("language") and t in m["language"]["tasks"] else math.nan
                            for t in langeval.ITEMS},
                         "test_fingerprint": m.get("evaluation", {}).get("test", {}).get("fingerprint", "")})
        return pd.DataFrame(rows), histories

    def test_window_losses(self) -> dict[str, list[float]]:
        """Each finished point's loss on every test window, by name. The points of a sweep share one
        prepared split and one `eval_seed`, so their windows are the same (`test_fingerprint` says so)."""
        out = {}
        for p in self.points:
            m = self.finished(p)
            if m is not None and m.get("test_window_losses"):
                out[p.name] = m["test_window_losses"]
        return out


def plan(cfg: Config, folder: str | Path, grid: str = "seeds", seeds: int = 3, experts=(2, 4, 8),
         per_token=(1, 2), keep_active_params: bool = False, budget_tokens: int = 0, log=print,
         arms="all", dense_iso_total: bool = False) -> Sweep:
    """The sweep of `grid` around `cfg` (its seed is the first seed) in `folder`, checked against what
    the folder already holds."""
    points = grid_points(cfg, grid, seed_list(cfg.seed, seeds), tuple(experts), tuple(per_token), keep_active_params,
                         arms, dense_iso_total)
    sweep = Sweep(cfg, Path(folder), points, budget_steps(cfg, budget_tokens), log)
    for p in points:      # every point's settings valid before any work (e.g. 8 experts x 2 per token)
        sweep.point_config(p)
    sweep.check_plan()
    return sweep


def load(folder: str | Path, log=print) -> Sweep:
    """A sweep read back from its folder alone (`sweep.json` and each point's metrics), whatever grid and
    seeds made it: e.g. a finished seeds sweep whose seed-to-seed spread a one-seed grid is read against."""
    folder = Path(folder)
    path = folder / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"{folder} holds no sweep (no sweep.json). Fix: give the --out folder of a sweep "
                          "(python -m llm_nb_utils.sweep), e.g. docs/sweep-arms-small-2000.")
    kept = read_json(path, "delete sweep.json to start the sweep over")
    cfg = make_config(kept["preset"], kept["settings"])
    points = []
    for metrics in folder.glob("runs/*/metrics/*.json"):
        model = metrics.stem                   # <arm>.json; <arm>_samples.json are generations
        if model not in ARMS:
            continue
        c = read_json(metrics, "")["config"]
        p = (Point(model, c["seed"], c["num_experts"], c["num_experts_per_token"], c["moe_intermediate_size"])
             if ARMS[model].has_experts else Point(model, c["seed"], dense_ff_width=c.get("dense_ff_width", 0)))
        if p.name == metrics.parent.parent.name:          # a run folder of this sweep, as it named it
            points.append(p)
    order = list(ARMS)                          # grid_points' order: seed-major, then the registry's arms
    points.sort(key=lambda p: (p.seed, order.index(p.model), p.num_experts, p.num_experts_per_token, p.dense_ff_width))
    return Sweep(cfg, folder, points, kept["steps"], log)


def main(argv=None) -> int:
    """Execute notebook 06 with papermill (it plans, estimates, runs the points and reports), and
    render its HTML report."""
    from .config import config_arguments, config_from_arguments
    from .device import DeviceError, resolve_device
    from .distributed import Dist, resolve_gpus
    from .env import default_run_dir
    from .pipeline import resume_command, run_from_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m llm_nb_utils.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    config_arguments(p, seed_help="the first seed (default: the preset's, 123)",
                     steps_help="budget per run in steps (default: the preset's)")
    p.add_argument("--grid", default="seeds", choices=["seeds", "moe"])
    p.add_argument("--seeds", type=int, default=3, help="seeds per design (the first is --seed)")
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], help="moe grid: numbers of experts")
    p.add_argument("--per-token", type=int, nargs="+", default=[1, 2], help="moe grid: experts per token")
    p.add_argument("--arms", nargs="+", default=["all"], metavar="ARM",
                   help=f"the arms to train (default all: {', '.join(ARMS)})")
    p.add_argument("--dense-iso-total", action="store_true",
                   help="also a Dense-GQA as wide as all the experts together (MoE-GQA's total parameters)")
    p.add_argument("--keep-active-params", action="store_true",
                   help="moe grid: scale the expert width so per-token x width stays the preset's")
    p.add_argument("--budget-tokens", type=int, default=0, help="budget per run in training tokens (wins over steps)")
    p.add_argument("--max-hours", type=float, default=KAGGLE_SESSION_HOURS, help="warn above this estimated total")
    p.add_argument("--source", default="auto", choices=["auto", "local", "gutenberg"])
    p.add_argument("--corpus-dir", default="")
    p.add_argument("--wandb-mode", default="offline", choices=["online", "offline", "disabled"])
    p.add_argument("--gpus", default="auto", help="training processes per run (auto: every visible CUDA GPU)")
    p.add_argument("--out", default="", help="sweep folder (default: outputs/sweep-<grid>-<preset>)")
    p.add_argument("--kernel", default="python3")
    p.add_argument("--seed-spread-from", default="", metavar="FOLDER",
                   help="a finished sweep with several seeds: read this sweep's one-seed gaps against its seed spread")
    args = p.parse_args(argv)

    try:
        preset, why, overrides, cfg = config_from_arguments(args)
        out = Path(args.out) if args.out else default_run_dir(preset).with_name(f"sweep-{args.grid}-{preset}")
        resolve_device(cfg.device)
        Dist(world_size=resolve_gpus(args.gpus, cfg.device)).check_batch(cfg.batch_size)
        arms = ",".join(parse_arms(args.arms))
        plan(cfg, out, args.grid, args.seeds, args.experts, args.per_token, args.keep_active_params,
             args.budget_tokens, log=lambda *_: None, arms=arms,
             dense_iso_total=args.dense_iso_total)          # refuse a bad grid before starting a kernel
        if args.seed_spread_from:
            load(args.seed_spread_from, log=lambda *_: None)
    except (ConfigError, StorageError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = dict(preset=preset, overrides=overrides, run_dir=str(out), corpus_source=args.source,
                  corpus_dir=args.corpus_dir, seed=cfg.seed, max_steps=args.max_steps, wandb_mode=args.wandb_mode,
                  progress=False, grid=args.grid, seeds=args.seeds, experts=args.experts,
                  experts_per_token=args.per_token, keep_active_params=args.keep_active_params,
                  budget_tokens=args.budget_tokens, max_hours=args.max_hours, kernel=args.kernel, gpus=args.gpus,
                  arms=arms, dense_iso_total=args.dense_iso_total,
                  seed_spread_from=str(Path(args.seed_spread_from).resolve()) if args.seed_spread_from else "")
    print(f"[sweep] preset {preset} ({why}); folder {out}")
    t0 = time.perf_counter()
    resume = resume_command(argv).replace("llm_nb_utils.pipeline", "llm_nb_utils.sweep")
    status, reports = run_from_cli(params, out, ("06_sweep",), resume, "sweep", kernel=args.kernel)
    if status is not None:
        return status
    print(f"\n[sweep] finished in {format_duration(time.perf_counter() - t0)}; report: {reports[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
