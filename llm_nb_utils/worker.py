"""What torchrun starts once per rank: one rank of a data-parallel training (`engine.run_training`).

The front door (`train.train_model(..., gpus=2)`) starts it through `launch.launch_torchrun` and holds
the run's lock itself (`--lock-held`). From a shell, for a script or several nodes, start it directly;
rank 0 then holds the lock:

    torchrun --nproc_per_node=8 -m llm_nb_utils.worker --model moe_gqa --preset paper --run-dir outputs/run-paper
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m llm_nb_utils.worker --model gpt2 --preset paper --run-dir /shared/run-paper

(the run directory, with its prepared data/, must be readable by every node).
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext

from torch import distributed as torch_dist

from .arms import ARM_NAMES
from .config import Config, config_arguments, config_from_arguments
from .distributed import init_process
from .engine import run_training
from .runfolder import RunFolder


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    p = argparse.ArgumentParser(prog="torchrun ... -m llm_nb_utils.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=ARM_NAMES)
    p.add_argument("--run-dir", required=True, help="a run directory whose data/ is prepared (notebook 01)")
    config_arguments(p, default_preset="paper")
    p.add_argument("--config", default="", help="every setting as JSON (Config.to_json; what the front door passes)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--lock-held", action="store_true", help="the process that started torchrun holds the lock")
    args = p.parse_args(argv)
    cfg = Config.from_json(args.config) if args.config else config_from_arguments(args)[2]
    folder = RunFolder(args.run_dir)
    dist = init_process(cfg.device)

    @record          # torchrun's summary then shows the failing rank's traceback
    def run():
        locked = dist.is_main and not args.lock_held
        with folder.training_lock(args.model) if locked else nullcontext():
            run_training(args.model, cfg, folder, dist, resume=not args.no_resume, progress=False)

    start = time.time()
    finished = False
    try:
        run()
        finished = True
    finally:
        if torch_dist.is_initialized():
            # Rank 0 still writes metrics and samples when the others are done; a rank that tore the
            # gloo group down meanwhile was aborted now and then ("terminate called without an active
            # exception"). So the ranks that finished wait for each other first; a failed one does not.
            if finished:
                torch_dist.barrier()
            torch_dist.destroy_process_group()
    if dist.is_main:
        print(f"{args.model}: {dist.world_size} processes done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
