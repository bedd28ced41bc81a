"""Summarise py-spy raw stacks (from throughput.py --profile) by self time and inclusive time per function."""

import collections
import sys


def main(path: str, top: int = 30) -> None:
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        if not frames:
            continue
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"{total} samples\n-- self --")
    for f, n in self_t.most_common(top):
        print(f"{100 * n / total:5.1f}%  {f}")
    print("-- inclusive --")
    for f, n in incl.most_common(top):
        print(f"{100 * n / total:5.1f}%  {f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)
