"""Estimate pi by throwing darts — PyMW's classic example, on pymw-magic.

Each task throws ``darts`` random darts at the unit square with its own
seed and counts those inside the quarter circle; the master adds them up.

    python examples/monte_pi.py [--tasks 200] [--darts 50000] [--workers N] [--backend local]
"""

from __future__ import annotations

import argparse
import math
import random
import time

from pymw_magic import Master
from pymw_magic.progress import TextProgress


def throw_darts(seed: int, darts: int) -> int:
    """Darts, out of ``darts``, that land inside the quarter circle."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(darts):
        x, y = rng.random(), rng.random()
        if x * x + y * y <= 1.0:
            hits += 1
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--darts", type=int, default=50_000, help="darts per task")
    parser.add_argument("--workers", type=int, default=None, help="default: the machine's cores")
    parser.add_argument("--backend", default="local")
    args = parser.parse_args()

    with Master(args.backend, workers=args.workers) as master:
        t0 = time.perf_counter()
        job = master.map_async(throw_darts, range(args.tasks), [args.darts] * args.tasks, name="monte-pi")
        with TextProgress(job):
            hits = sum(job.result())
        elapsed = time.perf_counter() - t0
        per_worker = master.tasks_per_worker

    total = args.tasks * args.darts
    estimate = 4.0 * hits / total
    print(f"pi is about {estimate:.6f} (error {abs(estimate - math.pi):.2e}) "
          f"from {total:,} darts in {args.tasks} tasks")
    print(f"{args.tasks / elapsed:,.1f} tasks/s, {elapsed:.2f} s on {master.workers} "
          f"{args.backend} workers")
    for worker, n in sorted(per_worker.items()):
        print(f"  {worker}: {n} tasks")


if __name__ == "__main__":
    main()
