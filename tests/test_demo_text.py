"""test_demo_text.py: demo/extract_austen.py on R lazy-load databases this test writes itself.

Run by tests/test_demo_text.sh with any python3 (standard library only; no download, no R).

The test serializes R objects in R's XDR format (version 3 header, character vectors with
NA elements, integer and logical vectors, named lists whose `names` attribute is a tagged
pairlist, the second `names` symbol as a back-reference the way R writes repeated symbols),
builds the package layout demo/get_text.sh unpacks (data/Rdata.rdx gzip'd index,
data/Rdata.rdb objects compressed with zlib, bzip2 and xz), and checks that the extracted
text is exactly the six novels' lines in publication order (and --train / --eval the first
five and the last). Then hostile packages: missing
files, a truncated database, an index pointing past its end, an unsupported R type, a novel
missing, and 150 random byte mutations of a good database; each must end with exit status
non-zero and one line on stderr naming the problem (or, for a mutation that happens to stay
valid, succeed), never a Python traceback.
"""
import bz2
import gzip
import lzma
import os
import random
import struct
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRACT = os.path.join(ROOT, "demo", "extract_austen.py")
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
failures = []


def expect(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL", what)


# ---- a small R serializer (XDR, format version 3) --------------------------------------------
def i32(v):
    return struct.pack(">i", v)


class RWriter:
    def __init__(self):
        self.symbols = []

    def char(self, s):
        if s is None:
            return i32(9) + i32(-1)  # NA_character_
        b = s.encode("utf-8")
        return i32(9 | (8 << 12)) + i32(len(b)) + b  # CHARSXP marked UTF-8 in its levels bits

    def symbol(self, name):
        if name in self.symbols:  # R writes a repeated symbol as a reference
            return i32(((self.symbols.index(name) + 1) << 8) | 255)
        self.symbols.append(name)
        return i32(1) + self.char(name)

    def strings(self, items):
        return i32(16) + i32(len(items)) + b"".join(self.char(s) for s in items)

    def ints(self, items, kind=13):
        return i32(kind) + i32(len(items)) + b"".join(i32(v) for v in items)

    def named_list(self, d):
        body = i32(19 | (1 << 9)) + i32(len(d)) + b"".join(d.values())
        attrs = i32(2 | (1 << 10)) + self.symbol("names") + self.strings(list(d.keys())) + i32(254)
        return body + attrs

    @staticmethod
    def header():
        return b"X\n" + i32(3) + i32(0x040300) + i32(0x030500) + i32(5) + b"UTF-8"


def serialize(build):
    w = RWriter()
    return RWriter.header() + build(w)


def make_books(rng):
    books = {}
    for k, name in enumerate(NOVELS):
        lines = ["%s" % name.upper(), "", "by Jane Austen", ""]
        for _ in range(rng.randrange(20, 60)):
            words = [rng.choice(["the", "a", "Mr.", "Darcy's", "café", "—", "said", "she", "1811", "  "])
                     for _ in range(rng.randrange(0, 12))]
            lines.append(" ".join(words))
        lines.insert(5, None)  # an NA line becomes an empty line
        books[name] = lines
    return books


def write_package(root, books, compressions=("zlib", "bz2", "xz"), extra_objects=None):
    data = os.path.join(root, "usr/lib/R/site-library/janeaustenr/data")
    os.makedirs(data, exist_ok=True)
    db, index = b"", {}
    objects = {name: serialize(lambda w, lines=lines: w.strings(lines)) for name, lines in books.items()
               if lines is not None}
    objects.update(extra_objects or {})
    for k, (name, raw) in enumerate(objects.items()):
        how = compressions[k % len(compressions)]
        if how == "zlib":
            blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        elif how == "bz2":
            blob = struct.pack(">I", len(raw)) + b"2" + bz2.compress(raw)
        else:
            blob = struct.pack(">I", len(raw)) + b"Z" + lzma.compress(raw)
        index[name] = (len(db), len(blob))
        db += blob
    rdx = serialize(lambda w: w.named_list({
        "variables": w.named_list({n: w.ints(list(v)) for n, v in index.items()}),
        "references": w.named_list({}),
        "compressed": w.ints([1], kind=10)}))
    with gzip.open(os.path.join(data, "Rdata.rdx"), "wb") as f:
        f.write(rdx)
    with open(os.path.join(data, "Rdata.rdb"), "wb") as f:
        f.write(db)
    return os.path.join(data, "Rdata.rdb")


def expected_text(books):
    return "\n\n\n".join("\n".join(s or "" for s in books[n]).strip() + "\n" for n in NOVELS)


def extract(root, out, *split):
    return subprocess.run([sys.executable, EXTRACT, root, out, *split], capture_output=True, text=True)


def expect_clean_failure(what, root, out):
    r = extract(root, out)
    lines = r.stderr.strip().splitlines()
    expect(r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr and "extract_austen.py:" in lines[0],
           "%s: want one error line, got exit %d and %r" % (what, r.returncode, r.stderr[-300:]))
    expect(not os.path.exists(out), "%s: a failed run left %s" % (what, out))
    return lines[0] if lines else ""


def main():
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed %d" % seed)
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="test_demo_text.")

    books = make_books(rng)
    good = os.path.join(tmp, "good")
    rdb = write_package(good, books)
    out = os.path.join(tmp, "out.txt")
    train, evaluation = os.path.join(tmp, "train.txt"), os.path.join(tmp, "eval.txt")
    r = extract(good, out, "--train", train, "--eval", evaluation)
    expect(r.returncode == 0, "good package: exit %d: %s" % (r.returncode, r.stderr.strip()))
    if r.returncode == 0:
        got = open(out, encoding="utf-8").read()
        expect(got == expected_text(books), "good package: the text differs from the novels' lines")
        last = "\n".join(s or "" for s in books[NOVELS[-1]]).strip() + "\n"
        expect(open(evaluation, encoding="utf-8").read() == last, "--eval is not the last novel")
        expect(open(train, encoding="utf-8").read() + "\n\n\n" + last == got, "--train is not the first five novels")
        print("  good package: %d characters, six novels in order, NA lines empty; train/eval split" % len(got))
        for f in (out, train, evaluation):
            os.remove(f)

    print("  " + expect_clean_failure("no package", os.path.join(tmp, "nowhere"), out))
    bad = os.path.join(tmp, "truncated")
    write_package(bad, books)
    data = open(os.path.join(bad, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"), "rb").read()
    open(os.path.join(bad, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"), "wb").write(data[:len(data) // 2])
    print("  " + expect_clean_failure("truncated rdb", bad, out))
    bad = os.path.join(tmp, "missing-novel")
    write_package(bad, {k: v for k, v in books.items() if k != "emma"})
    print("  " + expect_clean_failure("missing novel", bad, out))
    bad = os.path.join(tmp, "closure")
    write_package(bad, books, extra_objects={"austen_books": RWriter.header() + i32(3) + i32(254)})
    print("  " + expect_clean_failure("closure object", bad, out))
    bad = os.path.join(tmp, "not-a-list")
    write_package(bad, books)
    with gzip.open(os.path.join(bad, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"), "wb") as f:
        f.write(serialize(lambda w: w.strings(["variables"])))
    print("  " + expect_clean_failure("index not a list", bad, out))

    # random mutations of the good database: a clean error or a valid result, never a crash
    good_rdb = open(rdb, "rb").read()
    mutated = os.path.join(tmp, "mutated")
    write_package(mutated, books)
    mrdb = os.path.join(mutated, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    crashes = 0
    for trial in range(150):
        b = bytearray(good_rdb)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        open(mrdb, "wb").write(bytes(b))
        r = extract(mutated, out)
        if r.returncode == 0:
            os.remove(out)
        elif "Traceback" in r.stderr or len(r.stderr.strip().splitlines()) != 1:
            crashes += 1
            if crashes == 1:
                print("  mutation %d crashed: %s" % (trial, r.stderr[-500:]))
    expect(crashes == 0, "%d of 150 mutated databases crashed the extractor" % crashes)

    # the uncompressed index (R's own decompressed objects): R-level corruption, not zlib's
    for trial in range(150):
        raw = bytearray(serialize(lambda w: w.strings(books["emma"])))
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        write_package(mutated, dict(books, emma=None), extra_objects={"emma": bytes(raw)})
        r = extract(mutated, out)
        if r.returncode == 0:
            os.remove(out)
        elif "Traceback" in r.stderr or len(r.stderr.strip().splitlines()) != 1:
            crashes += 1
            if crashes == 1:
                print("  R-level mutation %d crashed: %s" % (trial, r.stderr[-500:]))
    expect(crashes == 0, "mutated R objects crashed the extractor")

    import shutil
    shutil.rmtree(tmp)
    if failures:
        print("%d checks failed (seed %d)" % (len(failures), seed))
        return 1
    print("extract_austen: exact text from a zlib/bz2/xz database, 5 bad packages and 300 mutations handled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
