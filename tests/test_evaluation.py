"""The evaluation protocol: which windows a loss reads, and how sure it is."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm_nb_utils import evaluation as ev
from llm_nb_utils.config import ConfigError, make_config
from llm_nb_utils.data import load_splits
from llm_nb_utils.device import resolve_precision
from llm_nb_utils.loss import linear_cross_entropy
from llm_nb_utils.arms import build_model
from llm_nb_utils.stats import t_quantile


def cfg(**kw):
    return make_config("smoke", device="cpu", **kw)


@pytest.mark.parametrize("n_total,n", [(1000, 10), (1003, 7), (50, 50), (12, 1)])
def test_a_stratified_sample_takes_one_window_in_every_stratum(n_total, n):
    idx = ev.stratified_indices(n_total, n, seed=5)
    edges = np.arange(n + 1) * n_total // n
    assert len(idx) == n and (np.diff(idx) > 0).all()
    assert ((idx >= edges[:-1]) & (idx < edges[1:])).all()      # exactly one in each stratum


def test_the_sample_depends_on_its_own_seed_only():
    a = ev.periodic_sample("val", 5000, cfg(seed=1))
    b = ev.periodic_sample("val", 5000, cfg(seed=99, emb_dim=32, lr=1e-3))     # another model, another seed
    assert a.how == "spread" and np.array_equal(a.indices, b.indices)
    c = ev.periodic_sample("val", 5000, cfg(eval_seed=7))
    assert not np.array_equal(a.indices, c.indices)
    train = ev.periodic_sample("train", 5000, cfg())
    assert not np.array_equal(a.indices, train.indices)                         # a stream per split
    t = ev.test_sample(5000, cfg())
    assert t.n == 128 and t.describe().startswith("128 of 5,000 windows (4,096 tokens, 2.6% of the split), spread")


def test_the_study_protocol_reads_the_first_batches_and_the_whole_test_split():
    c = cfg(eval_protocol="study", test_windows=50)
    s = ev.periodic_sample("train", 5000, c)
    assert s.how == "first" and np.array_equal(s.indices, np.arange(c.eval_iter * c.batch_size))
    t = ev.test_sample(300, c)
    assert t.how == "all" and t.n == 300 and t.describe() == "all 300 windows of the split (9,600 tokens)"
    assert ev.test_sample(300, cfg(test_windows=0)).how == "all"


def test_bad_evaluation_settings_are_one_line_errors():
    with pytest.raises(ev.EvalSampleError, match="val split has 5 windows, fewer than the 8 .*Fix: a smaller eval_iter"):
        ev.periodic_sample("val", 5, cfg())
    with pytest.raises(ev.EvalSampleError, match="test split has 100 windows.*Fix: test_windows=0"):
        ev.test_sample(100, cfg(test_windows=128))
    notes = []                                  # in a training run: the whole split, and a warning
    assert ev.test_sample(100, cfg(test_windows=128), notes).how == "all"
    assert notes == ["the test split has only 100 windows, fewer than the 128 its evaluation asks for "
                     "(test_windows=128): it reads all of them"]
    with pytest.raises(ConfigError, match="eval_protocol must be one of sampled, study"):
        cfg(eval_protocol="first")
    with pytest.raises(ConfigError, match="test_windows must be an integer >= 0"):
        cfg(test_windows=-1)


def test_per_row_losses_of_the_fused_head_are_cross_entropy_row_by_row():
    torch.manual_seed(0)
    h, w, t = torch.randn(37, 16), torch.randn(100, 16), torch.randint(0, 100, (37,))
    with torch.no_grad():
        rows = linear_cross_entropy(h, w, t, vocab_block=64, reduction="none")
        mean = linear_cross_entropy(h, w, t, vocab_block=64)
    ref = F.cross_entropy(h @ w.T, t, reduction="none")
    torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.mean(), mean, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="torch.no_grad"):
        linear_cross_entropy(h.requires_grad_(), w, t, reduction="none")


def _brute_force(model, dataset, indices):
    """Each window's loss from the full logits, one window at a time."""
    out = []
    with torch.no_grad():
        for i in indices:
            x, y = dataset[int(i)]
            logits = model(x[None]).logits[0]
            out.append(F.cross_entropy(logits, y).item())
    return np.array(out)


@pytest.mark.parametrize("name", ["gpt2", "moe_gqa"])
def test_the_whole_split_test_loss_is_the_mean_over_every_window(prepared_run, name):
    c = cfg(test_windows=0)
    model = build_model(name, c).eval()
    ds = load_splits(prepared_run / "data", c)["test"].dataset
    sample = ev.test_sample(len(ds), c)
    losses = ev.window_losses(model, ds, sample, c.batch_size, resolve_precision("float32", torch.device("cpu")))
    assert sample.how == "all" and len(losses) == len(ds)
    np.testing.assert_allclose(losses, _brute_force(model, ds, range(len(ds))), rtol=1e-5, atol=1e-5)


def test_the_study_protocol_gives_the_first_batches_values(prepared_run):
    """eval_protocol="study": the mean over the loader's first eval_iter batches, as the study computed it."""
    c = cfg(eval_protocol="study")
    model = build_model("gpt2", c).eval()
    loaders = load_splits(prepared_run / "data", c)
    sample = ev.periodic_sample("val", len(loaders["val"].dataset), c)
    got = ev.window_losses(model, loaders["val"].dataset, sample, c.batch_size,
                           resolve_precision("float32", torch.device("cpu"))).mean()
    total = count = 0.0
    with torch.no_grad():
        for i, (x, y) in enumerate(loaders["val"]):
            if i == c.eval_iter:
                break
            total += F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    assert got == pytest.approx(total / count, rel=1e-6)


def test_standard_error_and_intervals_match_hand_computed_values():
    x = [1.0, 2.0, 3.0, 4.0]
    e = ev.estimate(x)
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in x) / 3)
    assert e.mean == 2.5 and e.se == pytest.approx(sd / 2)
    assert e.high - e.mean == pytest.approx(t_quantile(0.975, 3) * sd / 2)
    p = ev.paired([1.0, 2.0, 3.0], [1.5, 2.0, 3.25])
    d = [0.5, 0.0, 0.25]
    sd_d = math.sqrt(sum((v - 0.25) ** 2 for v in d) / 2)
    assert p.diff.mean == pytest.approx(0.25) and p.diff.se == pytest.approx(sd_d / math.sqrt(3))
    assert p.variation_pct == pytest.approx(100 * 0.25 / 2.0)
    assert p.variation_ci_pct[0] == pytest.approx(100 * p.diff.low / 2.0)
    assert not p.beyond_noise                 # 3 windows: the interval covers zero


def test_pairing_removes_what_the_windows_share():
    """Two models whose window losses move together (hard windows are hard for both): the paired
    interval of the difference is far narrower than the two separate intervals suggest."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(5.0, 1.0, 500)
    a = difficulty + rng.normal(0, 0.05, 500)
    b = difficulty - 0.05 + rng.normal(0, 0.05, 500)
    p = ev.paired(a, b)
    unpaired_half = math.sqrt(p.a.se ** 2 + p.b.se ** 2) * 1.96
    assert p.diff.half_width < unpaired_half / 5
    assert p.beyond_noise and p.diff.high < 0                  # b is lower, and the pairing sees it
    assert p.a.low < p.b.mean < p.a.high                       # while the separate intervals overlap
