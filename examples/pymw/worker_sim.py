#!/usr/bin/env python
"""A desktop grid simulated with PyMW's grid-simulator interface.

    python examples/pymw/worker_sim.py -n 50 -t 100
    python examples/pymw/worker_sim.py -n 50 --trace event_trace.tab

Workers have random speeds (instructions per second) and are available
every other 100 s (or follow a Failure Trace Archive trace).  A task
function is called with the worker it runs on and returns its length in
instructions (PyMW's convention); the scheduling function gives each task
to the fastest free worker.  Nothing real runs: the output is the virtual
time and PyMW's statistics.  ``-i`` is accepted and ignored (this program
always simulates).
"""

import random
from optparse import OptionParser

from pymw_magic.compat import interfaces, pymw


def fastest_worker(task_list, worker_list):
    return task_list[0], max(worker_list, key=lambda w: w._speed)


def short_task(worker):
    return 15.0


def long_task(worker):
    return 60.0


def main():
    parser = OptionParser(usage="usage: %prog [-n WORKERS] [-t TASKS] [--trace FILE]")
    parser.add_option("-t", "--num_tasks", dest="n_tasks", default="100", help="tasks of each length")
    parser.add_option("--trace", dest="trace", default="", help="FTA event_trace.tab for the workers")
    parser.add_option("-s", "--seed", dest="seed", default="3", help="random seed of the worker speeds")
    options, _ = interfaces.parse_options(parser)
    n_workers, n_tasks = int(options.n_workers), int(options.n_tasks)
    rng = random.Random(int(options.seed))

    grid = interfaces.grid_simulator.GridSimulatorInterface()
    master = pymw.PyMW_Master(interface=grid, scheduler_func=fastest_worker)
    if options.trace:
        grid.read_workers_from_fta_tab_files(options.trace, num_workers=n_workers)
    else:
        grid.generate_workers(n_workers, lambda i: max(1.0, rng.normalvariate(2, 0.5)),
                              lambda i: ([100.0] * 1000, [1.0, 0.0] * 500))
    tasks = [master.submit_task(long_task) for _ in range(n_tasks)]
    tasks += [master.submit_task(short_task) for _ in range(n_tasks)]
    for task in tasks:
        master.get_result(task)
    stats = master.get_status()
    del stats["tasks"]
    for key in sorted(stats):
        value = stats[key]
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
