#!/usr/bin/env python3
"""The demo's table and plot from evaluation results.

  report.py --out PREFIX LABEL=results.json [LABEL=results.json ...] [--title TEXT]

Each results file is what demo/reference_eval.py writes (the inference stage's evaluation
writes the same shape): {"model", "engine", "device", "results": [{"rope", "length",
"perplexity", "passkey_accuracy", "trials", ...}]}. LABEL names the model state, e.g.
before=... after=....

Writes PREFIX.md (a Markdown table: one row per context length, a perplexity and a passkey
column per LABEL/rope) and PREFIX.png (perplexity against context length, log-log, and
passkey accuracy against context length; one line per LABEL/rope). With matplotlib
(demo/requirements.txt) the PNG is matplotlib's; without it, a plain raster drawn with the
standard library and a 5x7 font of its own, with the same title, axis names, tick labels and
legend.
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


# A 5x7 bitmap font for the plot without matplotlib: each glyph is 7 rows of 5 bits (hex,
# most significant bit on the left). Text is drawn in capitals; a character without a
# glyph is drawn as '?'.
FONT_5X7 = {
    '0': "0e11131519110e", '1': "040c040404040e", '2': "0e11010204081f", '3': "1f02040201110e",
    '4': "02060a121f0202", '5': "1f101e0101110e", '6': "0608101e11110e", '7': "1f010204080808",
    '8': "0e11110e11110e", '9': "0e11110f01020c", 'A': "0e11111f111111", 'B': "1e11111e11111e",
    'C': "0e11101010110e", 'D': "1c12111111121c", 'E': "1f10101e10101f", 'F': "1f10101e101010",
    'G': "0e11101711110f", 'H': "1111111f111111", 'I': "0e04040404040e", 'J': "0702020202120c",
    'K': "11121418141211", 'L': "1010101010101f", 'M': "111b1515111111", 'N': "11111915131111",
    'O': "0e11111111110e", 'P': "1e11111e101010", 'Q': "0e11111115120d", 'R': "1e11111e141211",
    'S': "0f10100e01011e", 'T': "1f040404040404", 'U': "1111111111110e", 'V': "11111111110a04",
    'W': "1111111515150a", 'X': "11110a040a1111", 'Y': "11110a04040404", 'Z': "1f01020408101f",
    ' ': "00000000000000", '.': "00000000000c0c", ',': "000000000c0408", ':': "000c0c000c0c00",
    ';': "000c0c000c0408", '(': "02040808080402", ')': "08040202020408", '/': "00010204081000",
    '-': "0000001f000000", '+': "0004041f040400", '%': "18190204081303", '=': "00001f001f0000",
    '_': "0000000000001f", '>': "08040201020408", '?': "0e110102040004", "'": "04040800000000",
    '*': "0004150e150400",
}



def write_plain_png(path, series, title=""):
    """The same two panels without matplotlib (standard library only): a raster with the
    title, axes with their names, tick labels at the measured lengths and at the ends of the
    value range, grid lines, one coloured line per series and a legend naming each, in the
    5x7 font above. Used where matplotlib is not installed, e.g. in CI."""
    import math
    import struct
    import zlib
    w, h = 1000, 440
    left_pad, right_pad, top_pad, bottom_pad = 70, 20, 60, 95
    img = bytearray(b"\xff" * (w * h * 3))

    def dot(x, y, c, r=1):
        for yy in range(y - r, y + r + 1):
            for xx in range(x - r, x + r + 1):
                if 0 <= xx < w and 0 <= yy < h:
                    img[3 * (yy * w + xx):3 * (yy * w + xx) + 3] = bytes(c)

    def line(x0, y0, x1, y1, c, r=1):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            dot(round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), c, r)

    def text_width(t, scale=1):
        return len(t) * 6 * scale

    def text(x, y, t, c=(0, 0, 0), scale=1, anchor="left"):
        """Draws t with its top-left corner at (x, y) (anchor "center" or "right" moves it)."""
        t = t.upper()
        if anchor == "center":
            x -= text_width(t, scale) // 2
        elif anchor == "right":
            x -= text_width(t, scale)
        for k, ch in enumerate(t):
            rows = FONT_5X7.get(ch, FONT_5X7["?"])
            for ry in range(7):
                bits = int(rows[2 * ry:2 * ry + 2], 16)
                for rx in range(5):
                    if bits & (1 << (4 - rx)):
                        for sy in range(scale):
                            for sx in range(scale):
                                xx, yy = x + (6 * k + rx) * scale + sx, y + ry * scale + sy
                                if 0 <= xx < w and 0 <= yy < h:
                                    img[3 * (yy * w + xx):3 * (yy * w + xx) + 3] = bytes(c)

    colours = [(230, 150, 60), (40, 90, 200), (120, 200, 120), (200, 40, 40), (150, 80, 180), (90, 90, 90)]
    lengths = sorted({n for _, _, by_len in series for n in by_len})
    if not lengths:
        return
    lx = [math.log2(n) for n in lengths]
    x_lo, x_hi = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
    ppls = [r["perplexity"] for _, _, b in series for r in b.values() if r.get("perplexity")]
    y_lo, y_hi = (math.log(min(ppls)), math.log(max(ppls))) if ppls else (0.0, 1.0)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    text(w // 2, 12, title[:160], scale=1, anchor="center")
    panels = [(0, "perplexity (log)", lambda r: math.log(r["perplexity"]) if r.get("perplexity") else None, y_lo, y_hi,
               lambda v: "%.1f" % math.exp(v)),
              (w // 2, "passkey accuracy", lambda r: r.get("passkey_accuracy"), -0.05, 1.05, lambda v: "%.1f" % v)]
    for x_off, name, value, lo, hi, fmt in panels:
        left, right, top, bottom = x_off + left_pad, x_off + w // 2 - right_pad, top_pad, h - bottom_pad
        px = lambda v: round(left + (v - x_lo) / (x_hi - x_lo) * (right - left))  # noqa: E731
        py = lambda v: round(bottom - (v - lo) / (hi - lo) * (bottom - top))  # noqa: E731
        last_label_end = -1  # a tick label that would overlap the previous one is left out
        for v, n in zip(lx, lengths):
            line(px(v), top, px(v), bottom, (225, 225, 225), 0)
            if px(v) - text_width(str(n)) // 2 > last_label_end + 4:
                text(px(v), bottom + 6, str(n), anchor="center")
                last_label_end = px(v) + text_width(str(n)) // 2
        line(left, bottom, right, bottom, (0, 0, 0), 0)
        line(left, top, left, bottom, (0, 0, 0), 0)
        y_ticks = [y_lo, y_hi] if name.startswith("perplexity") else [0.0, 0.5, 1.0]
        for v in y_ticks:
            line(left - 4, py(v), left, py(v), (0, 0, 0), 0)
            text(left - 6, py(v) - 3, fmt(v), anchor="right")
        text((left + right) // 2, top - 16, name, scale=2, anchor="center")
        text((left + right) // 2, bottom + 20, "context length (tokens, log)", anchor="center")
        for k, (label, rope, by_len) in enumerate(series):
            pts = [(px(math.log2(n)), py(value(by_len[n]))) for n in sorted(by_len) if value(by_len[n]) is not None]
            c = colours[k % len(colours)]
            for (a, b), (cx, cy) in zip(pts, pts[1:]):
                line(a, b, cx, cy, c)
            for a, b in pts:
                dot(a, b, c, 3)
    for k, (label, rope, _) in enumerate(series):  # the legend, under both panels
        x, y = left_pad + (k % 3) * 300, h - bottom_pad + 42 + (k // 3) * 14
        c = colours[k % len(colours)]
        line(x, y + 3, x + 24, y + 3, c)
        text(x + 30, y, "%s %s" % (label, rope), c=(0, 0, 0))
    raw = b"".join(b"\x00" + bytes(img[3 * w * y:3 * w * (y + 1)]) for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)  # noqa: E731
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path + ".tmp.png", "wb") as f:
        f.write(png)
    os.replace(path + ".tmp.png", path)


def main():
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[0] != "--out":
        sys.exit("usage: report.py --out PREFIX LABEL=results.json [LABEL=results.json ...]")
    prefix, series_args = argv[1], argv[2:]
    title = None
    if "--title" in series_args:
        i = series_args.index("--title")
        if i + 1 >= len(series_args):
            sys.exit("report.py: --title needs a value")
        title = series_args[i + 1]
        series_args = series_args[:i] + series_args[i + 2:]
    series, meta = load(series_args)
    if title:
        meta.insert(0, title)
    print(write_table(prefix + ".md", series, meta), end="")
    try:
        write_plot(prefix + ".png", series, title or "; ".join(meta))
        print("wrote %s.md and %s.png" % (prefix, prefix))
    except ImportError:
        write_plain_png(prefix + ".png", series, title or "; ".join(meta))
        print("wrote %s.md and %s.png (no matplotlib: the plain plot, drawn with its own font)" % (prefix, prefix))


if __name__ == "__main__":
    main()
