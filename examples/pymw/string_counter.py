#!/usr/bin/env python
"""Count strings in a file shipped to the workers with ``data_files``, PyMW style.

    python examples/pymw/string_counter.py -i generic -n 2 -f /usr/include/stdio.h

Each task opens the file by its bare name, in the directory the data file
was unpacked into on its worker, and counts one search string.
"""

import os
import time
from optparse import OptionParser

from pymw_magic.compat import interfaces, pymw


def count_in_file(file_name, search):
    with open(file_name) as f:
        return sum(line.count(search) for line in f)


def main():
    parser = OptionParser(usage="usage: %prog [-i INTERFACE] [-n WORKERS] [-f FILE] [-w WORDS]")
    parser.add_option("-f", "--file", dest="file", default=os.path.abspath(__file__),
                      help="the file to search (default: this script)", metavar="FILE")
    parser.add_option("-w", "--words", dest="words", default="a,b,c,d,e,f,task",
                      help="comma-separated strings to count", metavar="WORDS")
    options, _ = interfaces.parse_options(parser)
    words = options.words.split(",")
    name = os.path.basename(options.file)

    start = time.time()
    master = pymw.PyMW_Master(interface=interfaces.get_interface(options))
    tasks = [master.submit_task(count_in_file, input_data=(name, word), data_files=(options.file,))
             for word in words]
    for word, task in zip(words, tasks):
        _, count = master.get_result(task)
        print(f"Counted {count} instances of {word!r}")
    print(f"Total time: {time.time() - start:.2f} s")


if __name__ == "__main__":
    main()
