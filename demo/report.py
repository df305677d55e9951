#!/usr/bin/env python3
"""The demo's table and plot from evaluation results.

  report.py --out PREFIX LABEL=results.json [LABEL=results.json ...]

Each results file is what demo/reference_eval.py writes (the inference stage's evaluation
writes the same shape): {"model", "engine", "device", "results": [{"rope", "length",
"perplexity", "passkey_accuracy", "trials", ...}]}. LABEL names the model state, e.g.
before=... after=....

Writes PREFIX.md (a Markdown table: one row per context length, a perplexity and a passkey
column per LABEL/rope) and PREFIX.png (perplexity against context length, log-log, and
passkey accuracy against context length; one line per LABEL/rope). Needs matplotlib for the
PNG only (demo/requirements.txt); the table is written without it.
"""
import json
import os
import sys


def load(args):
    series = []  # (label, rope, {length: result})
    meta = []
    for arg in args:
        if "=" not in arg:
            sys.exit("report.py: give results as LABEL=FILE, not %r" % arg)
        label, path = arg.split("=", 1)
        try:
            data = json.load(open(path))
            rows = data["results"]
            by_rope = {}
            for r in rows:
                by_rope.setdefault(str(r["rope"]), {})[int(r["length"])] = r
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit("report.py: %s is not a results file (%s)" % (path, e))
        for rope, by_len in by_rope.items():
            series.append((label, rope, by_len))
        meta.append("%s: %s, %s on %s" % (label, data.get("model", "?"), data.get("engine", "?"), data.get("device", "?")))
    return series, meta


def fmt_ppl(r):
    return "%.2f" % r["perplexity"] if r and r.get("perplexity") is not None else "-"


def fmt_pass(r):
    """exact/trials, and (found/trials) where the key was in the answer more often than exactly."""
    if not r or r.get("passkey_accuracy") is None:
        return "-"
    text = "%d/%d" % (round(r["passkey_accuracy"] * r["trials"]), r["trials"])
    if r.get("passkey_found") is not None and r["passkey_found"] != r["passkey_accuracy"]:
        text += " (found %d)" % round(r["passkey_found"] * r["trials"])
    return text


def write_table(path, series, meta):
    lengths = sorted({n for _, _, by_len in series for n in by_len})
    head = ["context"] + ["ppl %s %s" % (label, rope) for label, rope, _ in series] + \
           ["passkey %s %s" % (label, rope) for label, rope, _ in series]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in lengths:
        cells = [str(n)] + [fmt_ppl(s[2].get(n)) for s in series] + [fmt_pass(s[2].get(n)) for s in series]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\n" + "\n".join("- " + m for m in meta) + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text


def write_plot(path, series, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rope, by_len in series:
        ns = sorted(n for n in by_len if by_len[n].get("perplexity") is not None)
        name = "%s, RoPE %s" % (label, rope)
        style = "-" if label == series[-1][0] else "--"
        ax1.plot(ns, [by_len[n]["perplexity"] for n in ns], style, marker="o", label=name)
        ns = sorted(n for n in by_len if by_len[n].get("passkey_accuracy") is not None)
        ax2.plot(ns, [100 * by_len[n]["passkey_accuracy"] for n in ns], style, marker="o", label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: "%g" % v))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: "%g" % v if str(int(v))[0] in "1235" and v == int(v) else ""))
    ax1.set_ylabel("perplexity (held-out text)")
    ax2.set_ylabel("passkey retrieval accuracy (%)")
    ax2.set_ylim(-5, 105)
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main():
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[0] != "--out":
        sys.exit("usage: report.py --out PREFIX LABEL=results.json [LABEL=results.json ...]")
    prefix, series_args = argv[1], argv[2:]
    series, meta = load(series_args)
    print(write_table(prefix + ".md", series, meta), end="")
    try:
        write_plot(prefix + ".png", series, "; ".join(meta))
        print("wrote %s.md and %s.png" % (prefix, prefix))
    except ImportError:
        print("wrote %s.md (no matplotlib: no plot)" % prefix)


if __name__ == "__main__":
    main()
