#!/usr/bin/env python
"""Estimate pi by throwing darts, PyMW style, on pymw-magic's compat layer.

    python examples/pymw/monte_pi.py -i generic -n 2 -t 1000000
    python examples/pymw/monte_pi.py -i mpi -n 2

Each task throws ``num_tests / num_workers`` darts at the unit square and
counts those inside the quarter circle; the master adds the counts up.
"""

import math
import random
import time
from optparse import OptionParser

from pymw_magic.compat import interfaces, pymw


def throw_dart():
    x, y = random.random(), random.random()
    return 1 if x * x + y * y <= 1 else 0


def count_hits(seed, darts):
    random.seed(seed)
    return sum(throw_dart() for _ in range(darts)), darts


def main():
    parser = OptionParser(usage="usage: %prog [-i INTERFACE] [-n WORKERS] [-t DARTS]")
    parser.add_option("-t", "--num_tests", dest="n_tests", default="1000000",
                      help="number of darts to throw", metavar="N")
    options, _ = interfaces.parse_options(parser)
    n_tasks, n_tests = int(options.n_workers), int(options.n_tests)

    start = time.time()
    master = pymw.PyMW_Master(interface=interfaces.get_interface(options))
    per_task = n_tests // n_tasks
    tasks = [master.submit_task(count_hits, input_data=(seed, per_task),
                                modules=("random",), dep_funcs=(throw_dart,))
             for seed in range(n_tasks)]
    hits = darts = 0
    for _ in tasks:
        task, (task_hits, task_darts) = master.get_result()
        hits += task_hits
        darts += task_darts
    estimate = 4.0 * hits / darts
    print(f"Estimate of pi: {estimate:.6f}")
    print(f"Estimate error: {abs(estimate - math.pi):.6f}")
    print(f"Number of tasks: {n_tasks}")
    print(f"Darts per task: {per_task}")
    print(f"Total time: {time.time() - start:.2f} s")


if __name__ == "__main__":
    main()
