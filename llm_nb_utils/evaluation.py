"""What a loss is measured on, and how sure it is.

A split holds thousands of windows, and a curve point or a test loss reads some of them. Which ones
matters: the first windows of a split are one passage of one text, and two passages can favour
different models. Two protocols:

- ``sampled`` (the default): a fixed sample spread over the split. The split's windows are cut
  into N equal strata and one window is drawn from each, with a generator seeded by `eval_seed`
  alone, so every model, every evaluation point and every training seed reads the same windows
  and their differences are paired. The test split is read whole when `test_windows` is 0.
- ``study``: the study's own code path: the first `eval_iter` batches of each split in order (the
  training split unshuffled) for the curves, the whole test split for the test loss.

Every evaluation keeps the loss of each window (all windows have the same number of tokens, so
their mean is the token-weighted mean). From them: the standard error and 95% interval of a loss,
and, because the models read the same windows, the paired interval of a difference, which removes
what the windows' difficulty shares between models.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SuiteError
from .stats import t_quantile

PROTOCOLS = ("sampled", "study")
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}     # one independent stream of the eval seed per split


class EvalSampleError(SuiteError, ValueError):
    pass


def stratified_indices(n_total: int, n_sample: int, seed: int, stream: int = 0) -> np.ndarray:
    """`n_sample` window indices out of `n_total`, one drawn uniformly from each of `n_sample` equal
    strata (sorted, distinct); depends on (seed, stream) only."""
    if not 0 < n_sample <= n_total:
        raise ValueError(f"cannot draw {n_sample} of {n_total} windows")
    edges = np.arange(n_sample + 1, dtype=np.int64) * n_total // n_sample
    u = np.random.default_rng([seed, stream]).random(n_sample)
    return edges[:-1] + (u * (edges[1:] - edges[:-1])).astype(np.int64)


@dataclass
class EvalSample:
    """The windows one evaluation reads from one split."""
    split: str
    indices: np.ndarray
    n_total: int              # windows in the split
    tokens_per_window: int
    how: str                  # "spread" (stratified sample), "first" (the study's first batches), "all"

    @property
    def n(self) -> int:
        return len(self.indices)

    @property
    def tokens(self) -> int:
        return self.n * self.tokens_per_window

    def describe(self) -> str:
        """e.g. '1,024 of 16,468 windows (131,072 tokens, 6.2% of the split), spread over the split'."""
        if self.how == "all":
            return f"all {self.n_total:,} windows of the split ({self.tokens:,} tokens)"
        where = "spread over the split" if self.how == "spread" else "the first ones, in order"
        return (f"{self.n:,} of {self.n_total:,} windows ({self.tokens:,} tokens, {self.n / self.n_total:.1%} "
                f"of the split), {where}")

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"split": self.split, "windows": self.n, "windows_in_split": self.n_total, "tokens": self.tokens,
                "share": self.n / self.n_total, "how": self.how, "description": self.describe(),
                "fingerprint": self.fingerprint()}


def _sample(split: str, n_total: int, n_wanted: int, cfg, setting: str, fix: str,
            warnings: list | None = None) -> EvalSample:
    if n_wanted > n_total and warnings is not None:
        # Too little data is a warning in a training run, not a stop (as too few steps are): the
        # evaluation reads the whole split and the reports say so.
        warnings.append(f"the {split} split has only {n_total:,} windows, fewer than the {n_wanted:,} its "
                        f"evaluation asks for ({setting}): it reads all of them")
        n_wanted = n_total
    if n_wanted > n_total:
        raise EvalSampleError(
            f"the {split} split has {n_total:,} windows, fewer than the {n_wanted:,} its evaluation reads "
            f"({setting}). Fix: {fix}, or a larger corpus.")
    if n_wanted == n_total:
        return EvalSample(split, np.arange(n_total), n_total, cfg.context_length, "all")
    if cfg.eval_protocol == "study" and split != "test":
        return EvalSample(split, np.arange(n_wanted), n_total, cfg.context_length, "first")
    idx = stratified_indices(n_total, n_wanted, cfg.eval_seed, _SPLIT_STREAM[split])
    return EvalSample(split, idx, n_total, cfg.context_length, "spread")


def periodic_sample(split: str, n_total: int, cfg, warnings: list | None = None) -> EvalSample:
    """The windows every evaluation point reads from the training or validation split:
    eval_iter x batch_size of them (the study's cost). A split with fewer windows is refused, or,
    given a `warnings` list (a training run), read whole with a note appended there."""
    n = cfg.eval_iter * cfg.batch_size
    return _sample(split, n_total, n, cfg, f"eval_iter={cfg.eval_iter} x batch_size={cfg.batch_size}",
                   "a smaller eval_iter", warnings)


def test_sample(n_total: int, cfg, warnings: list | None = None) -> EvalSample:
    """The windows of the final test loss: the whole split under the study's protocol or with
    test_windows=0, else `test_windows` spread over it (too few windows: as `periodic_sample`)."""
    n = n_total if cfg.eval_protocol == "study" or not cfg.test_windows else cfg.test_windows
    return _sample("test", n_total, n, cfg, f"test_windows={cfg.test_windows}",
                   "test_windows=0 (the whole test split) or a smaller test_windows", warnings)


@torch.no_grad()
def window_losses(model, dataset, sample: EvalSample, batch_size: int, prec, dist=None,
                  expert_counts: list | None = None) -> np.ndarray:
    """Mean next-token loss of each window of `sample` (float64, in the sample's order).

    Batches of `batch_size` windows; under DDP each rank computes its slice of every batch and the
    per-window losses are summed over ranks once, at the end. `expert_counts`, if given, receives
    the MoE's assignments per batch."""
    was_training = model.training
    model.eval()
    out = torch.zeros(sample.n, dtype=torch.float64, device=prec.device)
    rows = torch.arange(batch_size)
    for start in range(0, sample.n, batch_size):
        idx = sample.indices[start:start + batch_size]
        x, y = (torch.stack(t) for t in zip(*(dataset[int(i)] for i in idx)))
        mine = start + (dist.shard(rows[:len(idx)]) if dist else rows[:len(idx)])
        if dist:
            x, y = dist.shard(x), dist.shard(y)
        if not y.numel():          # the last, partial batch may leave a rank nothing
            continue
        with prec.autocast():
            result = model(x.to(prec.device), y.to(prec.device), per_token=True)
        out[mine.to(prec.device)] = result.loss.double().mean(dim=1)
        if expert_counts is not None and result.routing:    # (layers, experts) assignments
            expert_counts.append(torch.stack([r.counts.cpu() for r in result.routing]))
    model.train(was_training)
    if dist is not None and dist.enabled:
        dist.sum_(out)
        if expert_counts:     # all ranks' assignments, once (not a collective per batch)
            expert_counts[:] = [dist.sum_(torch.stack(expert_counts).sum(0).to(prec.device)).cpu()]
    return out.cpu().numpy()


# --- how sure: intervals over windows -------------------------------------------------------------

@dataclass
class LossEstimate:
    """A mean loss over windows, its standard error and 95% interval (Student's t over windows).

    The error is that of a simple random sample of windows: for a stratified sample it is a little
    pessimistic. It says how much the figure would move with other text of the same kind; it says
    nothing about training noise, which only other seeds measure (notebook 06)."""
    mean: float
    se: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def estimate(losses, level: float = 0.95) -> LossEstimate:
    x = np.asarray(losses, dtype=np.float64)
    if x.size == 0:
        raise ValueError("estimate needs at least one window loss")
    mean = float(x.mean())
    if x.size == 1:
        return LossEstimate(mean, math.nan, math.nan, math.nan, 1)
    se = float(x.std(ddof=1) / math.sqrt(x.size))
    half = t_quantile(0.5 + level / 2, x.size - 1) * se
    return LossEstimate(mean, se, mean - half, mean + half, int(x.size))


@dataclass
class PairedEstimate:
    """b - a over the same windows: the difference, its paired interval, and the same as a
    variation in % of a's mean (the interval scaled by a's mean, taken as fixed)."""
    a: LossEstimate
    b: LossEstimate
    diff: LossEstimate

    @property
    def variation_pct(self) -> float:
        return 100 * self.diff.mean / self.a.mean

    @property
    def variation_ci_pct(self) -> tuple[float, float]:
        return 100 * self.diff.low / self.a.mean, 100 * self.diff.high / self.a.mean

    @property
    def beyond_noise(self) -> bool:
        """The interval of the difference excludes zero."""
        return self.diff.low > 0 or self.diff.high < 0


def paired(a_losses, b_losses, level: float = 0.95) -> PairedEstimate:
    a, b = np.asarray(a_losses, dtype=np.float64), np.asarray(b_losses, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired needs the losses of the same windows (got {a.size} and {b.size})")
    return PairedEstimate(estimate(a, level), estimate(b, level), estimate(b - a, level))
