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


def die(msg):
    sys.exit("compare_training.py: " + msg)


def row(name, log, wall, memory, where=""):
    try:
        with open(log, newline="") as f:
            text = f.read()
        if text and not text.endswith("\n"):
            die("%s ends in the middle of a row (a training cut off while it wrote?)" % log)
        r = list(csv.DictReader(text.splitlines()))
        for i, x in enumerate(r):
            if None in x.values() or None in x:
                die("%s: row %d does not have the header's columns" % (log, i + 2))
        secs = [float(x["step_seconds"]) for x in r]
        losses = [float(x["loss"]) for x in r]
        rates = [float(x["tokens_per_second"]) for x in r]
        if memory is None:
            memory = "%.2f GiB%s" % (max(float(x["peak_memory_gib"] or 0) for x in r), where)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        die("cannot read the training log %s (%s)" % (log, e))
    except (KeyError, ValueError, TypeError) as e:
        die("%s is not a training log of 05_train or peer_train.py (%s: %s)" % (log, type(e).__name__, e))
    if not r:
        die("%s holds no steps" % log)
    tail = losses[-20:]
    return "| %s | %d | %d s | %.1f s | %.3f s | %s | %s | %.4f | %.4f |" % (
        name, len(r), wall, sum(secs), statistics.median(secs),
        "{:,.0f}".format(statistics.median(rates)), memory, losses[-1],
        sum(tail) / len(tail))


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    ours_log, ours_wall, peer_log, peer_wall, peer_run = sys.argv[1:]
    try:
        ours_wall, peer_wall = float(ours_wall), float(peer_wall)
    except ValueError:
        die("the wall times must be seconds, got %r and %r" % (ours_wall, peer_wall))
    try:
        with open(peer_run) as f:
            peer = json.load(f)
        pm = peer.get("peak_memory_allocated_gib")
        peer_mem = "%.2f GiB (%.2f reserved)" % (pm, peer["peak_memory_reserved_gib"]) if pm is not None else "-"
    except (OSError, ValueError) as e:
        die("cannot read the peer's run file %s (%s)" % (peer_run, e))
    except (AttributeError, KeyError, TypeError) as e:
        die("%s is not peer_train.py's run file (%s: %s)" % (peer_run, type(e).__name__, e))
    on_gpu = peer.get("device", "cpu") != "cpu"  # peer_train.py names the GPU, or says cpu
    rows = [row("05_train (C/CUDA)", ours_log, ours_wall, None, "" if on_gpu else " (host, peak RSS)"),
            row("peer_train.py (%s)" % peer.get("engine", "PyTorch"), peer_log, peer_wall, peer_mem)]  # both read before a line is printed
    print("| trainer | steps | wall time | in steps | median step | median tokens/s | peak %s | last loss | mean loss, last 20 |"
          % ("GPU memory" if on_gpu else "memory"))
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
