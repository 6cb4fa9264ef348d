"""What the stop agreement costs a training step: Preemption.after_step in 2 gloo processes.

    python3 benchmarks/bench_poll.py [--steps 1000]

Each process runs a loop of 10 ms steps (a fast step: 32 images per GPU on 8 GPUs is 5 to
15 ms) and calls after_step after each, as train_one_epoch does. The figure is the time a
step spends inside after_step: what the loop pays. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import distributed  # noqa: E402
from utils.preemption import Preemption  # noqa: E402

STEP_S = 0.010


def _never_saves() -> str:
    raise AssertionError("no checkpoint is due in this benchmark")


def _steps(proc: distributed.ProcessInfo, steps: int, out_path: str) -> None:
    distributed.init_process_group(proc, "gloo", timeout_s=60)
    try:
        with Preemption(checkpoint_every_min=15) as preemption:
            for step in range(20):  # the group is made, the connections warmed
                preemption.after_step(0, step + 1, steps + 20, _never_saves)
            distributed.barrier()
            blocked = 0.0
            for step in range(steps):
                time.sleep(STEP_S)  # the step: on a GPU the host mostly waits for the device
                start = time.perf_counter()
                preemption.after_step(0, step + 21, steps + 20, _never_saves)
                blocked += time.perf_counter() - start
        with open(f"{out_path}.{proc.rank}", "w", encoding="utf-8") as f:
            f.write(str(blocked / steps))
    finally:
        distributed.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out_path = os.path.join(folder, "blocked")
        distributed.launch(_steps, (args.steps, out_path), nprocs=2)
        per_rank = []
        for rank in range(2):
            with open(f"{out_path}.{rank}", encoding="utf-8") as f:
                per_rank.append(float(f.read()))
    print(f"load average {os.getloadavg()[0]:.1f}; {args.steps} steps of "
          f"{STEP_S * 1000:.0f} ms in 2 processes")
    print(json.dumps({"blocking_ms_per_step": round(1000 * max(per_rank), 4),
                      "step_ms_assumed": round(STEP_S * 1000),
                      "share_of_step": round(max(per_rank) / STEP_S, 6)}))


if __name__ == "__main__":
    main()
