#!/usr/bin/env python3
"""Jane Austen's six novels as plain text, read out of Debian's r-cran-janeaustenr package.

The package (MIT-licensed packaging of public-domain Project Gutenberg texts) keeps each novel
as an R character vector, one line of the book per element, in R's lazy-load database:

  data/Rdata.rdx   gzip of an R-serialized list; its `variables` maps each object's name to
                   (offset, length) inside Rdata.rdb
  data/Rdata.rdb   the objects, each: 4-byte big-endian uncompressed length, then a zlib stream
                   (or one type byte '2' bzip2 / 'Z' xz / '0' none, then the stream)

An object is R's "XDR" serialization (format 2 or 3). We read only the node types that hold
plain data (character/logical/integer/double vectors, lists, pairlists, symbols, references)
and refuse anything else with a clear message, so no R is needed.

Usage: extract_austen.py PACKAGE_ROOT OUT.txt [--train TRAIN.txt] [--eval EVAL.txt]
  PACKAGE_ROOT is where the .deb was unpacked; OUT.txt gets all six novels, TRAIN.txt the
  first five and EVAL.txt the last one (Persuasion), so an evaluation can use unseen text.
Standard library only.
"""
import bz2
import gzip
import lzma
import os
import struct
import sys
import zlib

# The novels in publication order, as the package names them.
NOVELS = [("sensesensibility", "Sense and Sensibility"), ("prideprejudice", "Pride and Prejudice"),
          ("mansfieldpark", "Mansfield Park"), ("emma", "Emma"),
          ("northangerabbey", "Northanger Abbey"), ("persuasion", "Persuasion")]


class RFormatError(Exception):
    pass


class XdrReader:
    """Reads one R-serialized object (format 'X', versions 2 and 3)."""

    NILVALUE, EMPTYENV, BASEENV, GLOBALENV, UNBOUND, MISSINGARG, BASENAMESPACE = 254, 242, 241, 253, 252, 251, 247
    REFSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 255, 1, 2, 9, 10, 13, 14, 16, 19

    def __init__(self, data):
        self.data, self.pos, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise RFormatError("not an R XDR serialization (header %r)" % data[:2])
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer's R version, minimum R version to read it
        if version == 3:
            nelen = self.int()
            self.take(nelen)  # native encoding name
        elif version != 2:
            raise RFormatError("R serialization version %d is not supported" % version)

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise RFormatError("truncated R object")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def length(self):
        n = self.int()
        if n == -1:  # long vector: two more words
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        if n < 0 or n > len(self.data):
            raise RFormatError("implausible vector length %d" % n)
        return n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (self.NILVALUE, self.EMPTYENV, self.BASEENV, self.GLOBALENV, self.UNBOUND,
                    self.MISSINGARG, self.BASENAMESPACE):
            return None
        if kind == self.REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise RFormatError("bad reference %d" % index)
            return self.refs[index - 1]
        if kind == self.SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == self.LISTSXP:  # pairlist node: [attr] [tag] car cdr
            out = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag if tag is not None else len(out)] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if kind == self.NILVALUE:
                    return out
                if kind != self.LISTSXP:
                    raise RFormatError("pairlist ends in node type %d" % kind)
        if kind == self.CHARSXP:
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", errors="replace")
        if kind in (self.LGLSXP, self.INTSXP):
            n = self.length()
            value = list(struct.unpack(">%di" % n, self.take(4 * n)))
        elif kind == self.REALSXP:
            n = self.length()
            value = list(struct.unpack(">%dd" % n, self.take(8 * n)))
        elif kind in (self.STRSXP, self.VECSXP):
            value = [self.item() for _ in range(self.length())]
        else:
            raise RFormatError("R node type %d is not supported" % kind)
        if has_attr:
            attributes = self.item()
            if isinstance(attributes, dict) and "names" in attributes and kind == self.VECSXP:
                value = dict(zip(attributes["names"], value))
        return value


def read_lazyload_db(root):
    """Returns {name: R object} for every object in ROOT/usr/lib/R/site-library/janeaustenr/data."""
    data_dir = os.path.join(root, "usr/lib/R/site-library/janeaustenr/data")
    try:
        with open(os.path.join(data_dir, "Rdata.rdx"), "rb") as f:
            index_gz = f.read()
        with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
            db = f.read()
    except OSError as e:
        raise RFormatError("cannot read the package's data (%s)" % e)
    index = parse_object("the index Rdata.rdx", lambda: gzip.decompress(index_gz))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RFormatError("Rdata.rdx has no 'variables' table")
    objects = {}
    for name, where in index["variables"].items():
        if not (isinstance(where, list) and len(where) == 2 and all(isinstance(v, (int, float)) for v in where)):
            raise RFormatError("bad index entry for %s" % name)
        offset, size = int(where[0]), int(where[1])
        blob = db[offset:offset + size]
        if offset < 0 or size < 5 or len(blob) != size:
            raise RFormatError("index entry for %s points outside Rdata.rdb" % name)
        objects[name] = parse_object(name, lambda: decompress(name, blob))
    return objects


def decompress(name, blob):
    """One Rdata.rdb entry: 4-byte big-endian length, then the compressed object."""
    raw_len = struct.unpack(">I", blob[:4])[0]
    if blob[4:5] == b"x":
        raw = zlib.decompress(blob[4:])
    elif blob[4:5] == b"2":
        raw = bz2.decompress(blob[5:])
    elif blob[4:5] == b"Z":
        raw = lzma.decompress(blob[5:])
    elif blob[4:5] == b"0":
        raw = blob[5:]
    else:
        raise RFormatError("unknown compression for %s" % name)
    if len(raw) != raw_len:
        raise RFormatError("%s decompressed to %d bytes, index says %d" % (name, len(raw), raw_len))
    return raw


def parse_object(name, get_bytes):
    """Decompresses and reads one object; any failure becomes one RFormatError naming it."""
    try:
        return XdrReader(get_bytes()).item()
    except RFormatError as e:
        raise RFormatError("%s: %s" % (name, e))
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, TypeError, IndexError,
            KeyError, struct.error, RecursionError, MemoryError) as e:
        raise RFormatError("%s is corrupt (%s: %s)" % (name, type(e).__name__, e))


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    print("  %d characters, %d words -> %s" % (len(text), len(text.split()), path))


def main(argv):
    args = argv[1:]
    split = {}
    while len(args) >= 2 and args[-2] in ("--train", "--eval"):
        split[args[-2]] = args[-1]
        args = args[:-2]
    if len(args) != 2:
        sys.exit("usage: extract_austen.py PACKAGE_ROOT OUT.txt [--train TRAIN.txt] [--eval EVAL.txt]")
    root, out_path = args
    try:
        objects = read_lazyload_db(root)
    except RFormatError as e:
        sys.exit("extract_austen.py: %s: %s" % (root, e))
    parts = []
    for key, title in NOVELS:
        lines = objects.get(key)
        if not isinstance(lines, list) or not all(isinstance(s, str) or s is None for s in lines):
            sys.exit("extract_austen.py: %s: the package has no text for %s (%s)" % (root, title, key))
        text = "\n".join(s or "" for s in lines).strip() + "\n"
        parts.append(text)
        print("  %-22s %7d lines %8d words" % (title, len(lines), len(text.split())))
    # Books are separated by blank lines; the model sees them as one long stream of English.
    # The split for fine-tuning and evaluation keeps the last novel (Persuasion) unseen.
    write_text(out_path, "\n\n\n".join(parts))
    if "--train" in split:
        write_text(split["--train"], "\n\n\n".join(parts[:-1]))
    if "--eval" in split:
        write_text(split["--eval"], parts[-1])


if __name__ == "__main__":
    main(sys.argv)
