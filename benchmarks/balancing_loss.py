"""Does the load-balancing loss matter? Two finished MoE-GQA runs that differ in aux_loss_coef alone,
side by side: each expert's share of its layer's assignments over training (validation windows) and
on the test windows at the end, and the test loss of each with the paired difference.

    python -m llm_nb_utils.pipeline --preset small --only 01_data_prep 04_moe_gqa --out outputs/aux/on
    python -m llm_nb_utils.pipeline --preset small --only 01_data_prep 04_moe_gqa --out outputs/aux/off \\
        --set aux_loss_coef=0
    python benchmarks/balancing_loss.py outputs/aux/on outputs/aux/off --out docs/balancing-loss-small-300

Writes expert_shares.png and summary.json (and prints the summary) under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_nb_utils import figures  # noqa: E402
from llm_nb_utils.config import changed_settings  # noqa: E402
from llm_nb_utils.evaluation import paired  # noqa: E402
from llm_nb_utils.files import write_json  # noqa: E402
from llm_nb_utils.runfolder import RunFolder  # noqa: E402


def load(run_dir: str) -> dict:
    return RunFolder(Path(run_dir)).load_metrics("moe_gqa")


def check_comparable(a: dict, b: dict) -> None:
    """The two runs must differ in the balancing loss's weight and nothing else that shapes training."""
    ca, cb = ({k: v for k, v in m["config"].items() if k not in ("wandb_mode", "aux_loss_coef")} for m in (a, b))
    differ = sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))
    if differ or a["config"]["aux_loss_coef"] == b["config"]["aux_loss_coef"]:
        raise SystemExit(f"error: the runs must differ in aux_loss_coef alone (they also differ in {differ or 'nothing'}). "
                         "Fix: train both with the same settings but --set aux_loss_coef.")


def run_summary(m: dict) -> dict:
    """Per layer, the busiest and the idlest expert's share of the test windows' assignments."""
    util = m["expert_utilisation"]
    return {"aux_loss_coef": m["config"]["aux_loss_coef"], "steps": m["steps"],
            "test_loss": m["test_loss"], "test_loss_ci": m["test_loss_ci"],
            "test_windows": m["evaluation"]["test"]["description"],
            "largest_share_per_layer": [round(max(r), 4) for r in util],
            "smallest_share_per_layer": [round(min(r), 4) for r in util]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("with_loss", help="run directory of the run with the balancing loss")
    p.add_argument("without_loss", help="run directory of the run with aux_loss_coef=0")
    p.add_argument("--out", required=True, help="folder for expert_shares.png and summary.json")
    args = p.parse_args(argv)
    on, off = load(args.with_loss), load(args.without_loss)
    check_comparable(on, off)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_experts = on["config"]["num_experts"]
    fig = figures.expert_share_by_run({f"aux_loss_coef={on['config']['aux_loss_coef']:g}": on["history"],
                                       f"aux_loss_coef={off['config']['aux_loss_coef']:g}": off["history"]}, n_experts)
    fig.savefig(out / "expert_shares.png", dpi=110)
    d = paired(on["test_window_losses"], off["test_window_losses"])
    settings = {k: v for k, v in changed_settings(on["config"]).items() if k not in ("wandb_mode", "aux_loss_coef")}
    summary = {"settings": {"preset": on["preset"], **settings},
               "even_share": 1 / n_experts, "with_loss": run_summary(on), "without_loss": run_summary(off),
               "test_loss_difference_without_minus_with": {"mean": d.diff.mean, "ci95": [d.diff.low, d.diff.high],
                                                           "variation_pct": d.variation_pct,
                                                           "variation_ci_pct": list(d.variation_ci_pct)},
               "device": on["device_name"], "torch": on["torch_version"]}
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
