#!/usr/bin/env python
"""A genetic algorithm (one-max) whose fitness evaluations are PyMW tasks.

    python examples/pymw/genetic_algorithm.py -i generic -n 2 -m 20 -l 20 -t 10

Each generation submits one task per individual, waits for all of them,
then selects (roulette wheel), crosses over and mutates on the master.
"""

import random
import time
from optparse import OptionParser

from pymw_magic.compat import interfaces, pymw


def fitness(individual):
    return sum(individual)


def select(scores, pool, rng):
    spin = rng.random() * sum(scores)
    for score, individual in zip(scores, pool):
        spin -= score
        if spin < 0:
            return individual
    return pool[-1]


def crossover(a, b, rng):
    cut = rng.randint(0, len(a))
    return a[:cut] + b[cut:], b[:cut] + a[cut:]


def mutate(individual, rate, rng):
    return [1 - g if rng.random() < rate else g for g in individual]


def main():
    parser = OptionParser(usage="usage: %prog [-i INTERFACE] [-n WORKERS] [-m INDIVIDUALS] [-l LENGTH] "
                                "[-t GENERATIONS]")
    parser.add_option("-m", "--num_individuals", dest="n_inds", default="20", help="population size")
    parser.add_option("-l", "--gene_length", dest="g_len", default="20", help="genes per individual")
    parser.add_option("-t", "--total_generations", dest="total_gens", default="10", help="generations")
    parser.add_option("-s", "--seed", dest="seed", default="1", help="random seed")
    options, _ = interfaces.parse_options(parser)
    n_inds, g_len, gens = int(options.n_inds), int(options.g_len), int(options.total_gens)
    rng = random.Random(int(options.seed))

    start = time.time()
    master = pymw.PyMW_Master(interface=interfaces.get_interface(options))
    pool = [[rng.randint(0, 1) for _ in range(g_len)] for _ in range(n_inds)]
    best = 0
    for gen in range(gens):
        tasks = [master.submit_task(fitness, input_data=(ind,)) for ind in pool]
        scores = [master.get_result(task)[1] for task in tasks]
        best = max(best, max(scores))
        print(f"Generation {gen} max fitness {max(scores)} average fitness {sum(scores) / n_inds:.2f}")
        children = []
        while len(children) < n_inds:
            a, b = select(scores, pool, rng), select(scores, pool, rng)
            if rng.random() < 0.7:
                a, b = crossover(a, b, rng)
            children += [mutate(a, 1.0 / g_len, rng), mutate(b, 1.0 / g_len, rng)]
        pool = children[:n_inds]
    print(f"Best individual: {best} / {g_len}")
    print(f"Total time: {time.time() - start:.2f} s")


if __name__ == "__main__":
    main()
