"""What a training run tells its user while it runs: an estimate up front, then progress.

Interactive runs get a tqdm bar (a widget in Jupyter); batch runs (papermill, the pipeline) get
one plain line at a steady interval, since a bar in a log file is noise. Both get the estimate:
after the first few steps, the steps still to go times the seconds a step measured, so that a
run that will take days says so in its first minute, not after its first evaluation.
"""
from __future__ import annotations

import time
from typing import Callable


def format_duration(seconds: float) -> str:
    """3725 -> '1 h 02 min'; 95 -> '1 min 35 s'; 4 -> '4 s'; 200000 -> '2 d 07 h'."""
    s = int(round(max(seconds, 0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d} d {h:02d} h"
    if h:
        return f"{h} h {m:02d} min"
    if m:
        return f"{m} min {s:02d} s"
    return f"{s} s"


class TrainingProgress:
    """Progress of one model's training, told at the points where the loop reads its loss back.

    Only those points are measured: elsewhere a GPU may still be working on steps the host has
    already queued. The first one after the start (which pays for allocations and warm-up) starts
    the clock; `estimate_after` steps later comes the estimate; in line mode a progress line then
    follows every `interval_s` seconds. `clock` is injectable for tests.
    """

    def __init__(self, name: str, total_steps: int, start_step: int, tokens_per_step: int, bar: bool,
                 log: Callable[[str], None] = print, interval_s: float = 60.0, estimate_after: int = 5,
                 clock: Callable[[], float] = time.perf_counter):
        self.name, self.total, self.start = name, total_steps, start_step
        self.tokens_per_step, self.log, self.interval_s = tokens_per_step, log, interval_s
        self.estimate_after, self.clock = estimate_after, clock
        self.t_start = clock()
        self.t_first = self.step_first = None     # the first measured point of this session
        self.t_last_line = self.t_start
        self.estimated = False
        self.bar = None
        if bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.log(message)

    def seconds_per_step(self, step: int) -> float | None:
        """Wall-clock seconds per step since the first measured point (evaluations included)."""
        if self.t_first is None or step <= self.step_first:
            return None
        return (self.clock() - self.t_first) / (step - self.step_first)

    def update(self, step: int, loss: float, lr: float | None = None) -> None:
        """Call where the loss of `step` has just been read back to the host."""
        now = self.clock()
        if self.t_first is None:
            self.t_first, self.step_first = now, step
        elif not self.estimated and step - self.step_first >= self.estimate_after:
            self.estimated = True
            self.write(self.estimate_message(step))
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}" if lr is not None else None)
        elif now - self.t_last_line >= self.interval_s:
            self.t_last_line = now
            self.log(self.progress_line(step, loss))

    def estimate_message(self, step: int) -> str:
        per_step = self.seconds_per_step(step)
        left = self.total - step
        return (f"{self.name}: about {format_duration(per_step * left)} for the {left:,} steps left of "
                f"{self.total:,} ({per_step:.3f} s/step over steps {self.step_first + 1}-{step}; "
                "evaluations add to this)")

    def progress_line(self, step: int, loss: float) -> str:
        per_step = self.seconds_per_step(step)
        elapsed = self.clock() - self.t_start
        eta = format_duration(per_step * (self.total - step)) if per_step else "?"
        tps = f"{self.tokens_per_step / per_step:,.0f}" if per_step else "?"
        return (f"{self.name} step {step:,}/{self.total:,} ({100 * step / max(self.total, 1):.1f}%) | "
                f"loss {loss:.3f} | {tps} tokens/s | elapsed {format_duration(elapsed)} | ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
