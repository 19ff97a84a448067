"""Train both models for a fixed number of steps on prepared data and print what they reached.

    python benchmarks/short_train.py --data outputs/run-small/data --preset small --max-steps 300

A quick, real run (the engine, real text) for figures: losses, perplexity, throughput, memory.
W&B is off, checkpoints go to the run directory beside the data.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_nb_utils.config import make_config, parse_overrides  # noqa: E402
from llm_nb_utils.arms import ARM_NAMES  # noqa: E402
from llm_nb_utils.train import train_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared data folder (train.bin, val.bin, test.bin, meta.json)")
    p.add_argument("--run-dir", default="", help="where checkpoints and metrics go (default: the data's parent)")
    p.add_argument("--preset", default="small")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--models", nargs="+", default=list(ARM_NAMES), choices=ARM_NAMES)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default="", help="also write the summary here")
    args = p.parse_args(argv)
    cfg = make_config(args.preset, parse_overrides(args.set), max_steps=args.max_steps, wandb_mode="disabled")
    data = Path(args.data).resolve()
    run = Path(args.run_dir) if args.run_dir else data.parent
    if (run / "data").resolve() != data:
        run.mkdir(parents=True, exist_ok=True)
        if not (run / "data").exists():
            (run / "data").symlink_to(data)
    rows = {}
    for name in args.models:
        m = train_model(name, cfg, run, progress=False)
        rows[name] = {k: m[k] for k in ("steps", "tokens_seen", "test_loss", "test_perplexity", "tokens_per_s",
                                         "train_time_s", "peak_memory_mb", "peak_memory_kind", "device_name", "dtype",
                                         "total_params", "active_params")}
        rows[name]["final_val_loss"] = m["history"][-1]["val_loss"] if m["history"] else None
        rows[name]["first_val_loss"] = m["history"][0]["val_loss"] if m["history"] else None
        if args.json:   # after each model: a run cut short by a time limit keeps what it finished
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
