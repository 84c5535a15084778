#!/usr/bin/env python
"""Find the primes in a range, split into one task per worker, PyMW style.

    python examples/pymw/prime_finder.py -i generic -n 2 -r 1 -s 100000

Each task tests its slice of the range with a deterministic Miller-Rabin
test (exact for every number below 3.3e24); the master merges the slices.
"""

import time
from optparse import OptionParser

from pymw_magic.compat import interfaces, pymw

BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n):
    if n < 2:
        return False
    for p in BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def primes_between(low, high):
    return [n for n in range(low, high + 1) if is_prime(n)]


def main():
    parser = OptionParser(usage="usage: %prog [-i INTERFACE] [-n WORKERS] [-r MIN] [-s MAX]")
    parser.add_option("-r", "--min_val", dest="min_val", default="1", help="smallest number checked", metavar="N")
    parser.add_option("-s", "--max_val", dest="max_val", default="100000", help="largest number checked",
                      metavar="N")
    options, _ = interfaces.parse_options(parser)
    n_tasks, low, high = int(options.n_workers), int(options.min_val), int(options.max_val)

    start = time.time()
    master = pymw.PyMW_Master(interface=interfaces.get_interface(options))
    step = (high - low + 1 + n_tasks - 1) // n_tasks
    bounds = [(a, min(a + step - 1, high)) for a in range(low, high + 1, step)]
    tasks = [master.submit_task(primes_between, input_data=b, dep_funcs=(is_prime,)) for b in bounds]
    primes = []
    for task in tasks:   # in order: the slices are already sorted
        _, found = master.get_result(task)
        primes.extend(found)
    print(f"Primes between {low} and {high}: {len(primes)}")
    print(f"Largest: {primes[-5:]}")
    print(f"Number of tasks: {len(tasks)}")
    print(f"Total time: {time.time() - start:.2f} s")


if __name__ == "__main__":
    main()
