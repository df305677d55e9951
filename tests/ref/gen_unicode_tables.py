#!/usr/bin/env python3
"""Writes 01_unicode_tables.h: the Unicode classes the byte-level BPE pre-tokenizers use.

    \\p{L}  letters                 \\p{N}  numbers (Nd Nl No)
    \\s     White_Space             (these three as the regex patterns see them)
    numeric  what the Digits pre-tokenizer splits off (Rust's char::is_numeric)
    word     what a single_word added token may not touch (the Rust regex crate's \\w)
    NFC      canonical decompositions and primary composites (from the library's NFD and NFC
             normalizers) and canonical combining classes (Python's unicodedata values, for
             the marks the library's NFD reorders)

Every class is read from the HF tokenizers library itself: \\p{L}, \\p{N}, \\s from its Oniguruma
regex engine (the one that runs the Split patterns we mirror), numeric by running its Digits
pre-tokenizer, word by running a single_word added token. So the tables follow the Unicode
versions of the library the tests compare against (Oniguruma and Rust differ slightly).
Needs `pip install tokenizers`; takes a minute. Run from the repo root:
    python3 tests/ref/gen_unicode_tables.py > 01_unicode_tables.h
"""
import sys
import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, __version__ as tokenizers_version
from tokenizers import models, pre_tokenizers
from tokenizers.pre_tokenizers import Digits, Split

CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
ALL_TEXT = "".join(map(chr, CODE_POINTS))


def members(pattern):
    """The code points that the one-character pattern matches, as the library's regex engine says."""
    kept = bytearray(len(CODE_POINTS))  # 1 where the character survives "removed" splitting
    for _, (a, b) in Split(Regex(pattern), "removed").pre_tokenize_str(ALL_TEXT):
        kept[a:b] = b"\x01" * (b - a)
    return [CODE_POINTS[i] for i in range(len(CODE_POINTS)) if not kept[i]]


def numeric():
    """Characters Digits(individual_digits=False) cuts out on their own between two 'a's."""
    text = "".join("a" + chr(c) for c in CODE_POINTS) + "a"
    return sorted(ord(p) for p, _ in Digits(individual_digits=False).pre_tokenize_str(text) if len(p) == 1 and p != "a")


def word():
    """Characters c for which a single_word token "qq" does not match in "cqq " (c is a word character)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_tokens([AddedToken("qq", single_word=True, special=False)])
    qid = tok.token_to_id("qq")
    cps = [c for c in CODE_POINTS if chr(c) not in "q "]
    out = []
    for start in range(0, len(cps), 65536):
        chunk = cps[start:start + 65536]
        enc = tok.encode("".join(chr(c) + "qq " for c in chunk), add_special_tokens=False)
        matched = {off[0] for tid, off in zip(enc.ids, enc.offsets) if tid == qid}
        out += [c for i, c in enumerate(chunk) if 4 * i + 1 not in matched]
    return sorted(out + [ord("q")])


def nfc_tables():
    """Canonical decompositions (Hangul excluded: it is algorithmic), the composition pairs of
    primary composites, and combining classes."""
    from tokenizers import normalizers
    cps = [c for c in CODE_POINTS if c != 0 and not 0xAC00 <= c <= 0xD7A3]
    sep = "\x00"  # decomposes and composes with nothing
    nfd = normalizers.NFD().normalize_str(sep.join(map(chr, cps))).split(sep)
    nfc = normalizers.NFC()
    decomp = {c: [ord(x) for x in d] for c, d in zip(cps, nfd) if d != chr(c)}
    stable = nfc.normalize_str(sep.join(chr(c) for c in decomp)).split(sep)
    back = nfc.normalize_str(sep.join("".join(map(chr, d)) for d in decomp.values())).split(sep)
    pairs = []
    for (c, d), st, bk in zip(decomp.items(), stable, back):
        if st != chr(c) or bk != chr(c) or len(d) < 2:
            continue  # excluded from composition, or a singleton
        first = nfc.normalize_str("".join(map(chr, d[:-1])))
        if len(first) != 1 or nfc.normalize_str(first + chr(d[-1])) != chr(c):
            one = unicodedata.decomposition(chr(c)).split()
            if len(one) != 2 or one[0].startswith("<"):
                print(f"warning: no composition pair for U+{c:04X}", file=sys.stderr)
                continue
            first, last = chr(int(one[0], 16)), int(one[1], 16)
        else:
            last = d[-1]
        pairs.append((ord(first), last, c))
    # Combining classes: Python's values, kept only for the marks the library's (older) tables
    # know as marks: m is a mark there iff NFD moves it before U+0345 (class 240) or after
    # U+0334 (class 1).
    marks = [c for c in CODE_POINTS if unicodedata.combining(chr(c))]
    nfd = normalizers.NFD()
    before = nfd.normalize_str(sep.join("a\u0345" + chr(c) for c in marks)).split(sep)
    after = nfd.normalize_str(sep.join("a" + chr(c) + "\u0334" for c in marks)).split(sep)
    ccc = [(c, unicodedata.combining(chr(c))) for c, b, a in zip(marks, before, after)
           if b != "a\u0345" + chr(c) or a != "a" + chr(c) + "\u0334" or c in (0x345, 0x334)]
    return decomp, sorted(pairs), ccc


def ranges(cps):
    out = []
    for c in cps:
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def emit(name, rs, what):
    print(f"/* {what}: {len(rs)} ranges */")
    print(f"static const uint32_t {name}[][2] = {{")
    line = "   "
    for a, b in rs:
        item = f" {{0x{a:X}, 0x{b:X}}},"
        if len(line) + len(item) > 100:
            print(line)
            line = "   "
        line += item
    print(line)
    print("};")
    print()


def main():
    letter = ranges(members(r"\p{L}"))
    number = ranges(members(r"\p{N}"))
    space = ranges(members(r"\s"))
    num_rust = ranges(numeric())
    word_rust = ranges(word())
    print("/* 01_unicode_tables.h: generated by tests/ref/gen_unicode_tables.py; do not edit.")
    print(f" * Classes as the tokenizers library {tokenizers_version} matches them (regex classes: its")
    print(" * Oniguruma engine; numeric and word: its Rust code).")
    print(" * Sorted inclusive code point ranges. */")
    print("#ifndef UNICODE_TABLES_H")
    print("#define UNICODE_TABLES_H")
    print("#include <stdint.h>")
    print()
    emit("UNI_LETTER", letter, "\\p{L}")
    emit("UNI_NUMBER", number, "\\p{N}")
    emit("UNI_WHITE_SPACE", space, "\\s")
    emit("UNI_NUMERIC", num_rust, "numeric (Digits): Rust char::is_numeric")
    emit("UNI_WORD", word_rust, "word (single_word): Rust regex \\w")
    decomp, pairs, ccc = nfc_tables()
    runs = []  # (first, last, class)
    for c, k in ccc:
        if runs and runs[-1][1] == c - 1 and runs[-1][2] == k:
            runs[-1][1] = c
        else:
            runs.append([c, c, k])
    print(f"/* canonical combining classes (values: Python unicodedata {unicodedata.unidata_version}): first, last, class; {len(runs)} runs */")
    print("static const uint32_t UNI_CCC[][3] = {")
    for i in range(0, len(runs), 6):
        print("   " + "".join(f" {{0x{a:X}, 0x{b:X}, {k}}}," for a, b, k in runs[i:i + 6]))
    print("};\n")
    pool = []
    print(f"/* canonical decompositions (Hangul syllables are algorithmic): code point, start in UNI_DECOMP_POOL, length; {len(decomp)} */")
    print("static const uint32_t UNI_DECOMP[][3] = {")
    items = []
    for c, d in sorted(decomp.items()):
        items.append(f" {{0x{c:X}, {len(pool)}, {len(d)}}},")
        pool += d
    for i in range(0, len(items), 5):
        print("   " + "".join(items[i:i + 5]))
    print("};")
    print("static const uint32_t UNI_DECOMP_POOL[] = {")
    for i in range(0, len(pool), 10):
        print("   " + "".join(f" 0x{x:X}," for x in pool[i:i + 10]))
    print("};\n")
    print(f"/* primary composites: first, second, composite, sorted; {len(pairs)} */")
    print("static const uint32_t UNI_COMPOSE[][3] = {")
    for i in range(0, len(pairs), 4):
        print("   " + "".join(f" {{0x{a:X}, 0x{b:X}, 0x{c:X}}}," for a, b, c in pairs[i:i + 4]))
    print("};\n")
    print("#endif")
    return 0


if __name__ == "__main__":
    sys.exit(main())
