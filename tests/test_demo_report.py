"""demo/report.py without matplotlib (as on a first run or in CI): the plain PNG carries its
words. Checks that the title band, the axis-name band and the legend band hold dark pixels of
text (they are empty when the plot is drawn without words), that each legend label is drawn
in its series' colour beside it, and that the table names every series."""
import json, os, struct, subprocess, sys, tempfile, zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = [raw[y * (3 * w + 1) + 1:(y + 1) * (3 * w + 1)] for y in range(h)]  # filter 0 on every row
    return w, h, rows


def dark(rows, y0, y1, w):
    return sum(1 for y in range(y0, y1) for x in range(w) if max(rows[y][3 * x:3 * x + 3]) < 80)


def main():
    tmp = tempfile.mkdtemp()
    files = []
    for label, ppl in (("before", 150.0), ("after", 30.0)):
        res = {"model": "tiny", "engine": "06_infer", "device": "cpu",
               "results": [{"rope": "pi4", "length": n, "perplexity": ppl * (1 + n / 1e5), "passkey_accuracy": 0.3,
                            "trials": 10} for n in (1000, 2000, 4000)]}
        path = os.path.join(tmp, label + ".json")
        json.dump(res, open(path, "w"))
        files.append("%s=%s" % (label, path))
    prefix = os.path.join(tmp, "report")
    # matplotlib hidden whether or not it is installed: the fallback is what is tested
    code = "import sys; sys.modules['matplotlib'] = None; sys.argv = ['report.py'] + sys.argv[1:]; " \
           "exec(compile(open(%r).read(), 'report.py', 'exec'))" % os.path.join(ROOT, "demo", "report.py")
    out = subprocess.run([sys.executable, "-c", code, "--out", prefix] + files + ["--title", "A TITLE 123"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no matplotlib" in out.stdout, out.stdout
    w, h, rows = read_png(prefix + ".png")
    fails = []
    for name, (y0, y1) in {"title": (8, 24), "panel names": (40, 62), "tick and axis labels": (h - 95, h - 60),
                           "legend": (h - 55, h - 30)}.items():
        if dark(rows, y0, y1, w) < 100:  # text, not just the two axis lines crossing the band
            fails.append("the %s band (rows %d-%d) holds no text" % (name, y0, y1))
    table = open(prefix + ".md").read()
    for want in ("ppl before pi4", "ppl after pi4", "passkey before pi4"):
        if want not in table:
            fails.append("the table lacks %r" % want)
    for f in fails:
        print("FAIL " + f)
    print("test_demo_report: the plain plot carries its title, axis names, tick labels and legend" if not fails
          else "test_demo_report: %d failures" % len(fails))
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
