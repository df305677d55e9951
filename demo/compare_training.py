#!/usr/bin/env python3
"""Two fine-tunes side by side: 05_train's and the PyTorch peer's (demo/peer_train.py).

  compare_training.py OURS_LOG.csv OURS_WALL_S PEER_LOG.csv PEER_WALL_S PEER_RUN.json

Prints a Markdown table: steps, wall time of the process (loading included), the time spent in
steps, the median step and tokens/s, the peak memory (on the GPU, 05_train's log: what its
allocator held; the peer: torch.cuda.max_memory_allocated, and what PyTorch's caching allocator
reserved; on the CPU, 05_train's log holds the process's peak resident memory, the peer none),
the loss of the last step and the mean loss of the last 20 steps. Standard library only.
"""
import csv
import json
import statistics
import sys


def row(name, log, wall, memory, where=""):
    r = list(csv.DictReader(open(log)))
    if not r:
        sys.exit("compare_training.py: %s holds no steps" % log)
    secs = [float(x["step_seconds"]) for x in r]
    tail = [float(x["loss"]) for x in r[-20:]]
    if memory is None:
        memory = "%.2f GiB%s" % (max(float(x["peak_memory_gib"] or 0) for x in r), where)
    return "| %s | %d | %d s | %.1f s | %.3f s | %s | %s | %.4f | %.4f |" % (
        name, len(r), wall, sum(secs), statistics.median(secs),
        "{:,.0f}".format(statistics.median(float(x["tokens_per_second"]) for x in r)), memory, float(r[-1]["loss"]),
        sum(tail) / len(tail))


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    ours_log, ours_wall, peer_log, peer_wall, peer_run = sys.argv[1:]
    peer = json.load(open(peer_run))
    pm = peer.get("peak_memory_allocated_gib")
    peer_mem = "%.2f GiB (%.2f reserved)" % (pm, peer["peak_memory_reserved_gib"]) if pm is not None else "-"
    on_gpu = peer.get("device", "cpu") != "cpu"  # peer_train.py names the GPU, or says cpu
    print("| trainer | steps | wall time | in steps | median step | median tokens/s | peak %s | last loss | mean loss, last 20 |"
          % ("GPU memory" if on_gpu else "memory"))
    print("|---|---|---|---|---|---|---|---|---|")
    print(row("05_train (C/CUDA)", ours_log, int(ours_wall), None, "" if on_gpu else " (host, peak RSS)"))
    print(row("peer_train.py (%s)" % peer.get("engine", "PyTorch"), peer_log, int(peer_wall), peer_mem))


if __name__ == "__main__":
    main()
