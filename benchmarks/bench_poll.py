"""What the per-step stop agreement costs: StepAgreement.poll() in 2 gloo processes on this machine.

    python3 benchmarks/bench_poll.py [--polls 2000]

The last line gives the time per poll and its ratio to a 100 ms training step (a fast step of
ResNet-18 at batch 256 on one GPU is about that; slower steps make the ratio smaller).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import distributed  # noqa: E402
from utils.preemption import StepAgreement  # noqa: E402

STEP_S = 0.1


def _polls(proc: distributed.ProcessInfo, polls: int, out_path: str) -> None:
    distributed.init_process_group(proc, "gloo", timeout_s=60)
    try:
        with StepAgreement(checkpoint_every_min=15) as agreement:
            for _ in range(20):  # the group is made, the connections warmed
                agreement.poll()
            distributed.barrier()
            start = time.perf_counter()
            for _ in range(polls):
                agreement.poll()
            seconds = time.perf_counter() - start
        if proc.is_main:
            with open(out_path, "w", encoding="utf-8") as f:
                f.write(str(seconds / polls))
    finally:
        distributed.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out_path = os.path.join(folder, "seconds_per_poll.txt")
        distributed.launch(_polls, (args.polls, out_path), nprocs=2)
        with open(out_path, encoding="utf-8") as f:
            per_poll = float(f.read())
    print(f"load average {os.getloadavg()[0]:.1f}; {args.polls} polls in 2 processes")
    print(f"poll {per_poll * 1e6:.1f} us; ratio to a {STEP_S * 1000:.0f} ms step {per_poll / STEP_S:.5f}")


if __name__ == "__main__":
    main()
