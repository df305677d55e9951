"""Where a kernel's warps wait, instruction by instruction, from Nsight Compute's source page.

    ncu --clock-control none --kernel-name regex:KERNEL --launch-skip 1 --launch-count 1 \\
        --section SourceCounters --section WarpStateStats -o A python3 bench/attn_profile.py ...
    ncu -i A.ncu-rep --page source --csv --print-source sass > A.csv
    python3 bench/attn_source.py A.csv [B.csv] [--top 30]

For each CSV (one kernel's SASS with its per-instruction counters) it prints the stall
samples summed by opcode family (HMMA, LDSM, BAR, RED, ...) as shares of the kernel's
samples, beside the instructions executed of each family, and then the --top instructions
with the most samples (address, opcode, samples, and the sampled stall reasons where the
page has them). Two CSVs are printed side by side, so that our kernel and a peer's can be
read against each other (bench/NOTES.md step 26). It reads files and prints; it runs nothing.
"""
import argparse
import csv
import re
import sys
from collections import defaultdict


def read_page(path):
    """rows of the source page as dicts: header = the first row that names 'Source'"""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    for i, row in enumerate(lines):
        if "Source" in row and any("Address" in c for c in row):
            header = row
            return [dict(zip(header, r)) for r in lines[i + 1:] if len(r) == len(header)], header
    sys.exit(f"attn_source.py: {path} has no source-page header (a row naming 'Address' and 'Source')")


def number(text):
    try:
        return float(text.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


def family(sass):
    """the opcode without its modifiers and predicate: '@!P0 HMMA.16816.F32.BF16 ...' -> 'HMMA'"""
    words = [w for w in sass.split() if not w.startswith("@")]
    return re.split(r"[.\s]", words[0])[0] if words else "?"


def column(header, *names):
    for n in names:
        for c in header:
            if c.strip().lower() == n.lower():
                return c
    return None


def summarise(path):
    rows, header = read_page(path)
    samples = column(header, "Warp Stall Sampling (All Samples)", "Sampling Data (All)")
    executed = column(header, "Instructions Executed", "Warp Instructions Executed")
    address = column(header, "Address", "# Address") or "Address"
    reasons = [c for c in header if (c.startswith("stall_") or c.lower().startswith("smsp__pcsamp_warps_issue_stalled")) and "not" not in c.lower()]
    fam_samples, fam_exec = defaultdict(float), defaultdict(float)
    per_insn = []
    for r in rows:
        f = family(r["Source"])
        s, e = number(r.get(samples, "0")), number(r.get(executed, "0"))
        fam_samples[f] += s
        fam_exec[f] += e
        why = {c: number(r[c]) for c in reasons if number(r[c]) > 0}
        per_insn.append((s, r.get(address, "?"), r["Source"].strip(), why))
    return {"path": path, "samples": fam_samples, "executed": fam_exec, "insns": per_insn, "columns": (samples, executed, len(reasons))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+", help="one or two source-page CSVs")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    kernels = [summarise(p) for p in args.csv[:2]]
    for k in kernels:
        print(f"{k['path']}: samples column {k['columns'][0]!r}, executed column {k['columns'][1]!r}, "
              f"{k['columns'][2]} stall-reason columns")
    fams = sorted({f for k in kernels for f in k["samples"]}, key=lambda f: -sum(k["samples"][f] for k in kernels))
    print(f"{'family':10s}" + "".join(f"{'samples %':>11s}{'executed M':>12s}" for _ in kernels))
    totals = [max(1.0, sum(k["samples"].values())) for k in kernels]
    for f in fams:
        print(f"{f:10s}" + "".join(f"{100 * k['samples'][f] / t:11.1f}{k['executed'][f] / 1e6:12.2f}" for k, t in zip(kernels, totals)))
    print(f"{'all':10s}" + "".join(f"{sum(k['samples'].values()):11.0f}{sum(k['executed'].values()) / 1e6:12.2f}" for k in kernels))
    for k, t in zip(kernels, totals):
        print(f"\n{k['path']}: the {args.top} instructions with the most samples")
        for s, addr, src, why in sorted(k["insns"], key=lambda x: -x[0])[: args.top]:
            top_why = ", ".join(f"{c.replace('smsp__pcsamp_warps_issue_stalled_', '')} {v:.0f}"
                                for c, v in sorted(why.items(), key=lambda x: -x[1])[:3])
            print(f"  {addr:>8s} {100 * s / t:5.1f}%  {src[:70]:70s} {top_why}")


if __name__ == "__main__":
    main()
