#!/usr/bin/env python3
"""The main loop of a GPU kernel, read off its machine code (SASS), with no GPU.

    python3 bench/sass_loops.py FILE KERNEL [--arch sm_80|sm_90] [--map] [--path ADDR,ADDR,...]

FILE is a .cubin (ours, or one taken out of a library: `cuobjdump -xelf all lib.so`) or one of
our .cu files, which is then compiled from compute_80 code, as `bench/attn_sm80.sh` builds it,
to sm_80 machine code (what an A100 runs) or, with --arch sm_90, to the sm_90 code the driver
makes of it on a Hopper card (the proxy the sm_80 numbers in bench/NOTES.md are measured on).
KERNEL is a substring of the mangled name (`flash_fwd_kernelILi128ELi128ELi64ELi4E` is the
d = 128 forward of 128 queries, 64-key tiles, 4 warps); it must pick out one function.

It prints the innermost loop that holds the most matrix products (HMMA): its size, its instruction
mix, and its straight-line blocks (split at branches and at their targets), each with its
own count, so that the instructions a warp runs on one path (the unmasked tile, say) are the
sum of the blocks on it: --path takes their start addresses and adds them up. --map prints
the loop as one character an instruction (H product, L shared-memory matrix load, G global
to shared copy, E exponential, * multiply, + add, m max, f fused multiply-add, p pack, s
shuffle, < > spill load / store, V vote, B branch, | barrier, . anything else), to see
whether the softmax runs beside the products or between them.

Needs cuobjdump (CUDA toolkit; or `pip install nvidia-cuda-cuobjdump`) and, for .cu, nvcc.
A static count, not a profile: it says what a warp issues, not how long it waits.
"""
import argparse, collections, os, re, subprocess, sys, tempfile

MAP = {'HMMA': 'H', 'LDSM': 'L', 'LDGSTS': 'G', 'MUFU': 'E', 'FMUL': '*', 'FADD': '+', 'FMNMX': 'm',
       'FFMA': 'f', 'F2FP': 'p', 'SHFL': 's', 'LDL': '<', 'STL': '>', 'VOTE': 'V', 'BRA': 'B', 'BAR': '|'}


def sass_of(path, kernel, arch):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = path
        if path.endswith('.cu'):  # its own folder's headers first, then the repository root's
            cubin = os.path.join(tmp, 'k.cubin')
            subprocess.run(['nvcc', '-O3', '-std=c++17', f'-gencode=arch=compute_80,code={arch}', '-DUSE_CUDA',
                            '-I', os.path.dirname(os.path.abspath(path)), '-I', '.', '-cubin', '-o', cubin, path],
                           check=True)
        text = subprocess.run(['cuobjdump', '-sass', cubin], check=True, capture_output=True, text=True).stdout
    funcs = re.split(r'\n\s*Function : ', text)[1:]
    hits = [f for f in funcs if kernel in f.split('\n', 1)[0]]
    if len(hits) != 1:
        sys.exit(f'sass_loops: "{kernel}" names {len(hits)} functions' +
                 ''.join('\n  ' + f.split('\n', 1)[0] for f in hits[:20]))
    return hits[0]


def parse(func):
    """[(address, opcode, instruction with its predicate, branch target or None)]"""
    rows = []
    for line in func.split('\n'):
        m = re.match(r'\s+/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;', line)
        if not m:
            continue
        ins = m.group(2)
        op = re.sub(r'^@!?U?P[0-9T]\s+', '', ins).split()[0]  # the opcode, past any predicate
        tgt = re.search(r'(?:BRA|CALL\S*)\s.*?(0x[0-9a-f]+)', ins)
        rows.append((int(m.group(1), 16), op, ins, int(tgt.group(1), 16) if tgt else None))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    ap.add_argument('file'); ap.add_argument('kernel')
    ap.add_argument('--arch', default='sm_80', choices=['sm_80', 'sm_90'])
    ap.add_argument('--map', action='store_true')
    ap.add_argument('--path', default='')
    a = ap.parse_args()
    rows = parse(sass_of(a.file, a.kernel, a.arch))
    loops = [(t, adr) for adr, op, _, t in rows if op.startswith('BRA') and t is not None and t < adr]
    prods = lambda lo, hi: sum(1 for adr, op, _, _ in rows if lo <= adr <= hi and op.startswith('HMMA'))
    if not loops:
        sys.exit('sass_loops: the function has no loop')
    lo, hi = max(loops, key=lambda l: (prods(*l), l[0] - l[1]))  # the most products, then the innermost
    body = [r for r in rows if lo <= r[0] <= hi]
    mix = collections.Counter(op.split('.')[0] for _, op, _, _ in body)
    print(f'loop {lo:#x}..{hi:#x}: {len(body)} instructions; ' + ' '.join(f'{k} {v}' for k, v in mix.most_common(16)))
    # straight-line blocks: a new one after each branch and at each branch target
    starts = {lo} | {t for _, op, _, t in body if t is not None and lo <= t <= hi}
    starts |= {body[i + 1][0] for i, (_, op, _, _) in enumerate(body[:-1]) if 'BRA' in op or 'CALL' in op or op == 'EXIT'}
    blocks, cur = [], []
    for r in body:
        if r[0] in starts and cur:
            blocks.append(cur); cur = []
        cur.append(r)
    blocks.append(cur)
    print(f'{"block":>8} {"instr":>6} {"HMMA":>5} {"MUFU":>5} {"LDSM":>5} {"LDGSTS":>6} {"LDL/STL":>7}  ends with')
    size = {}
    for b in blocks:
        c = collections.Counter(op.split('.')[0] for _, op, _, _ in b)
        size[b[0][0]] = len(b)
        last = b[-1][2] if b[-1][1].startswith(('BRA', 'BAR', 'CALL', 'EXIT')) else ''
        print(f'{b[0][0]:#8x} {len(b):6d} {c["HMMA"]:5d} {c["MUFU"]:5d} {c["LDSM"]:5d} {c["LDGSTS"]:6d} '
              f'{c["LDL"] + c["STL"]:7d}  {last}')
    if a.path:
        addrs = [int(x, 16) for x in a.path.split(',')]
        missing = [hex(x) for x in addrs if x not in size]
        if missing:
            sys.exit('sass_loops: no block starts at ' + ', '.join(missing))
        print(f'path {a.path}: {sum(size[x] for x in addrs)} instructions')
    if a.map:
        s = ''.join(MAP.get(op.split('.')[0], '.') for _, op, _, _ in body)
        print('\n'.join(s[i:i + 100] for i in range(0, len(s), 100)))


if __name__ == '__main__':
    main()
