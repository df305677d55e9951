"""The peer for the attention benchmark: PyTorch SDPA (flash and cuDNN backends) on the shapes
04_s2attn --bench measures, plus a check of our kernels against real torch.

Run by `make bench` on a GPU machine with torch:
    python bench/sdpa_peer.py --lib build/libs2attn.so --ours bench/results/attn_ours.json \
        --out bench/results/attn_sdpa.json [--fwd-variant V] [--bwd-variant V] [--d 64]
(--fwd-variant / --bwd-variant: the check runs our tile variant V of that kernel instead of
the default; --d: the head dimension of the timed shapes, 128 by default; --alternate 4096,32768:
also times ours and cuDNN in turns, --rounds turns each, on the same tensors; --alternate-with
flash: against SDPA flash (FlashAttention-2) instead, the peer of the sm_80 path.)

Check (the flash-attention project's criterion): for O, dQ, dK, dV of causal and S2 attention,
max |ours - ref| <= 2 * max |torch_bf16 - ref| + 1e-5, where ref is the same computation in
fp32 from the same bf16 inputs (explicit mask for S2) and torch_bf16 is torch's bf16 SDPA.
Timing: CUDA events, median of 10 after 2 warm-ups; FLOPs 4*B*H*N^2*d/2 forward, 3.5x that
forward+backward (the convention of the flash-attention benchmarks). Each backend's table
starts after 3 s of untimed work at N = 32k, as 04_s2attn --bench's does, so that it runs at
the clock the card holds under load rather than through its power cap's first overshoot
(bench/NOTES.md step 31).
"""
import argparse
import ctypes
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, D, TOKENS, REPS = 32, 128, 32768, 10
NS = [1024, 4096, 8192, 16384, 32768]


def median_ms(fn):
    times = []
    for r in range(REPS + 2):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        if r >= 2:
            times.append(e0.elapsed_time(e1))
    times.sort()
    return times[len(times) // 2]


def warm_to_steady_clock(backend, seconds=3.0):
    n = TOKENS
    q, k, v, do = (torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qt, kt, vt = (x.transpose(1, 2).requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    spent_ms = 0.0
    try:
        with sdpa_kernel(backend):
            while spent_ms < seconds * 1e3:
                e0.record()
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).backward(dot)
                e1.record()
                torch.cuda.synchronize()
                spent_ms += e0.elapsed_time(e1)
    except RuntimeError:  # the backend refuses the shape: its table says so
        pass
    del q, k, v, do, qt, kt, vt
    torch.cuda.empty_cache()


def bench_sdpa(backend):
    warm_to_steady_clock(backend)
    rows = []
    for n in NS:
        b = TOKENS // n
        q, k, v, do = (torch.randn(b, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        qt, kt, vt = (x.transpose(1, 2).requires_grad_() for x in (q, k, v))  # [B, H, N, d] views of [B, N, H, d]
        dot = do.transpose(1, 2)
        flop = 4.0 * b * H * n * n / 2 * D
        try:
            with sdpa_kernel(backend):
                fwd = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))

                def fb():
                    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                    out.backward(dot)

                fwdbwd = median_ms(fb)
        except RuntimeError as e:  # backend not available for this shape
            print(f"  {backend} N={n}: {str(e).splitlines()[0]}")
            continue
        rows.append({"N": n, "B": b, "fwd_ms": fwd, "fwd_tflops": flop / fwd / 1e9,
                     "fwdbwd_ms": fwdbwd, "fwdbwd_tflops": 3.5 * flop / fwdbwd / 1e9})
        del q, k, v, do, qt, kt, vt
        torch.cuda.empty_cache()
    return rows


# ---- our kernels through ctypes ------------------------------------------------------------
def load_ours(path):
    lib = ctypes.CDLL(path)
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.attn_forward.argtypes = [P] * 5 + [I] * 6
    lib.attn_backward.argtypes = [P] * 10 + [I] * 6
    lib.attn_backward_workspace_bytes.argtypes = [I] * 4
    lib.attn_backward_workspace_bytes.restype = ctypes.c_size_t
    return lib


def ours_fwd_bwd(lib, q, k, v, do, G):
    b, n, h, d = q.shape
    hk = k.shape[2]
    o = torch.full_like(q, float("nan"))
    lse = torch.full((b, h, n), float("nan"), device="cuda")
    dq, dk, dv = torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    ws = torch.empty(lib.attn_backward_workspace_bytes(b, n, h, d), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    assert lib.attn_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), b, n, h, hk, d, G) == 0
    assert lib.attn_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(),
                             dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), ws.data_ptr(), b, n, h, hk, d, G) == 0
    torch.cuda.synchronize()
    return o, dq, dk, dv


PEERS = {"cudnn": ("cuDNN", SDPBackend.CUDNN_ATTENTION), "flash": ("flash", SDPBackend.FLASH_ATTENTION)}


def alternate(lib, ns, rounds, peer="cudnn"):
    """Ours and one SDPA backend (PEERS) on the same tensors, timed in turns (each turn a median of
    REPS), so that a clock or power drift during the run moves both: the medians of the turns and
    their ratio. Row keys: ours_* and <peer>_*, fwd_ratio / fwdbwd_ratio = peer ms / ours ms."""
    label, backend = PEERS[peer]
    rows = []
    for n in ns:
        b = TOKENS // n
        q, k, v, do = (torch.randn(b, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        o, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
        lse = torch.empty((b, H, n), device="cuda")
        ws = torch.empty(lib.attn_backward_workspace_bytes(b, n, H, D), dtype=torch.uint8, device="cuda")
        p = [x.data_ptr() for x in (q, k, v, o, do, lse, dq, dk, dv, ws)]
        shape = (b, n, H, H, D, 0)
        ours_f = lambda: lib.attn_forward(p[0], p[1], p[2], p[3], p[5], *shape)
        ours_fb = lambda: (ours_f(), lib.attn_backward(*p, *shape))
        assert ours_f() == 0 and lib.attn_backward(*p, *shape) == 0
        qt, kt, vt = (x.transpose(1, 2).requires_grad_() for x in (q, k, v))  # [B, H, N, d] views
        peer_f = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        peer_fb = lambda: peer_f().backward(do.transpose(1, 2))
        turn = (("ours_fwd", ours_f), (peer + "_fwd", peer_f), ("ours_fwdbwd", ours_fb), (peer + "_fwdbwd", peer_fb))
        t = {name: [] for name, _ in turn}
        with sdpa_kernel(backend):
            for _ in range(rounds):
                for name, fn in turn:
                    t[name].append(median_ms(fn))
        flop = 4.0 * b * H * n * n / 2 * D
        row = {"N": n, "B": b, "rounds": rounds}
        for name, ts in t.items():
            ms = sorted(ts)[len(ts) // 2]
            row[name + "_ms"] = ms
            row[name + "_tflops"] = (3.5 if name.endswith("fwdbwd") else 1.0) * flop / ms / 1e9
        row["fwd_ratio"] = row[peer + "_fwd_ms"] / row["ours_fwd_ms"]
        row["fwdbwd_ratio"] = row[peer + "_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
        print(f"  in turns N={n} d={D}: ours/{label} forward {row['fwd_ratio']:.3f} ({row['ours_fwd_tflops']:.1f} / "
              f"{row[peer + '_fwd_tflops']:.1f}), forward+backward {row['fwdbwd_ratio']:.3f} ({row['ours_fwdbwd_tflops']:.1f} / "
              f"{row[peer + '_fwdbwd_tflops']:.1f}) TFLOP/s, {rounds} turns")
        rows.append(row)
        del q, k, v, do, o, dq, dk, dv, lse, ws, qt, kt, vt
        torch.cuda.empty_cache()
    return rows


def s2_mask(n, h, H_, G):
    """[N, N] bool: query i of head h sees keys s2_first_key(i) <= j <= i (common.h)."""
    i = torch.arange(n, device="cuda")
    if G == 0:
        first = torch.zeros_like(i)
    elif h < H_ // 2:
        first = (i // G) * G
    else:
        s = G // 2
        first = torch.where(i < s, torch.zeros_like(i), s + ((i - s) // G) * G)
    j = i[None, :]
    return (j <= i[:, None]) & (j >= first[:, None])


def torch_attn(q, k, v, do, G, dtype, use_sdpa):
    """[B, N, H, d] in; (o, dq, dk, dv) in fp32. K/V heads are repeated for GQA (autograd sums)."""
    b, n, h, d = q.shape
    r = h // k.shape[2]
    qt, kt, vt = (x.detach().to(dtype).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    ke, ve = kt.repeat_interleave(r, dim=1), vt.repeat_interleave(r, dim=1)
    if G == 0 and use_sdpa:
        out = F.scaled_dot_product_attention(qt, ke, ve, is_causal=True)
    else:
        mask = torch.stack([s2_mask(n, hh, h, G) for hh in range(h)])[None]  # [1, H, N, N]
        if use_sdpa:
            out = F.scaled_dot_product_attention(qt, ke, ve, attn_mask=mask)
        else:
            s = (qt @ ke.transpose(-1, -2)) / math.sqrt(d)
            out = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ ve
    out.backward(do.to(dtype).transpose(1, 2))
    back = lambda x: x.transpose(1, 2).float()
    return back(out.detach()), back(qt.grad), back(kt.grad), back(vt.grad)


def check_ours(lib):
    cases = [(2, 1000, 8, 8, 128, 0), (1, 777, 8, 2, 64, 0), (1, 2048, 8, 4, 128, 512), (2, 1536, 4, 4, 64, 384)]
    results, ok_all = [], True
    for b, n, h, hk, d, G in cases:
        q = torch.randn(b, n, h, d, device="cuda").bfloat16()
        k, v = (torch.randn(b, n, hk, d, device="cuda").bfloat16() for _ in range(2))
        do = torch.randn(b, n, h, d, device="cuda").bfloat16()
        ref = torch_attn(q, k, v, do, G, torch.float32, use_sdpa=False)
        tb = torch_attn(q, k, v, do, G, torch.bfloat16, use_sdpa=True)
        ours = [x.float() for x in ours_fwd_bwd(lib, q, k, v, do, G)]
        row = {"B": b, "N": n, "H": h, "Hk": hk, "d": d, "G": G}
        for name, o_, t_, r_ in zip(("O", "dQ", "dK", "dV"), ours, tb, ref):
            e_ours, e_torch = (o_ - r_).abs().max().item(), (t_ - r_).abs().max().item()
            ok = e_ours <= 2 * e_torch + 1e-5
            ok_all &= ok
            row[name] = {"ours": e_ours, "torch_bf16": e_torch, "ok": ok}
        results.append(row)
        print(f"  check B={b} N={n} H={h} Hk={hk} d={d} G={G}: " +
              "  ".join(f"{k_} {row[k_]['ours']:.2e}/{row[k_]['torch_bf16']:.2e}{'' if row[k_]['ok'] else ' FAIL'}" for k_ in ("O", "dQ", "dK", "dV")))
    return results, ok_all


def main():
    global D
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="build/libs2attn.so")
    ap.add_argument("--ours", default="bench/results/attn_ours.json")
    ap.add_argument("--out", default="bench/results/attn_sdpa.json")
    ap.add_argument("--fwd-variant", type=int, default=0, help="the forward tile variant our check runs (0: the library's default)")
    ap.add_argument("--bwd-variant", type=int, default=0, help="the backward tile variant our check runs (0: the library's default)")
    ap.add_argument("--d", type=int, default=D, choices=(64, 128), help="head dimension of the timed shapes")
    ap.add_argument("--alternate", default="", help="comma-separated N: also time ours and a peer in turns at these N")
    ap.add_argument("--alternate-with", default="cudnn", choices=sorted(PEERS), help="the SDPA backend --alternate times ours against")
    ap.add_argument("--rounds", type=int, default=5, help="turns each of --alternate's timings gets")
    args = ap.parse_args()
    D = args.d
    try:
        alt_ns = [int(x) for x in args.alternate.split(",")] if args.alternate else []
    except ValueError:
        ap.error(f"--alternate takes comma-separated N, not '{args.alternate}'")
    if any(n < 1 or TOKENS % n for n in alt_ns) or not 1 <= args.rounds <= 100:
        ap.error(f"--alternate: each N must divide {TOKENS}; --rounds 1..100")
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "H": H, "d": D, "tokens": TOKENS, "reps": REPS,
           "fwd_variant": args.fwd_variant, "bwd_variant": args.bwd_variant}
    lib = load_ours(args.lib)
    lib.attn_set_tile_variant.argtypes = [ctypes.c_int, ctypes.c_int]
    assert lib.attn_set_tile_variant(args.fwd_variant, args.bwd_variant) == 0, f"no variant {args.fwd_variant} / {args.bwd_variant}"
    print("our kernels against torch (max abs error vs fp32 reference: ours / torch bf16 SDPA)")
    res["check"], ok = check_ours(lib)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        res[name] = bench_sdpa(be)
    if args.alternate:
        res["alternate_with"] = args.alternate_with
        res["alternate"] = alternate(lib, alt_ns, args.rounds, args.alternate_with)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    ours = {}
    try:
        with open(args.ours) as f:
            ours = {(r["N"], r["G"]): r for r in json.load(f)["attention"]}
    except OSError:
        pass
    print(f"\ncausal H={H} d={D} B*N={TOKENS}: TFLOP/s forward | forward+backward")
    print(f"{'N':>6} {'ours':>7} {'flash':>7} {'cudnn':>7} {'o/fl':>6} | {'ours':>7} {'flash':>7} {'cudnn':>7} {'o/fl':>6}")
    fl, cu = {r["N"]: r for r in res["flash"]}, {r["N"]: r for r in res["cudnn"]}
    for n in NS:
        o, f_, c = ours.get((n, 0)), fl.get(n), cu.get(n)
        g = lambda r, key: f"{r[key]:7.1f}" if r else "      -"
        ratio = lambda key: f"{o[key] / f_[key]:6.2f}" if o and f_ else "     -"
        print(f"{n:>6} {g(o, 'fwd_tflops')} {g(f_, 'fwd_tflops')} {g(c, 'fwd_tflops')} {ratio('fwd_tflops')} | "
              f"{g(o, 'fwdbwd_tflops')} {g(f_, 'fwdbwd_tflops')} {g(c, 'fwdbwd_tflops')} {ratio('fwdbwd_tflops')}")
    for (n, G), r in sorted(ours.items()):
        if G:
            full = ours.get((G, 0))
            rel = f"  vs full causal at N={G}: {r['fwd_tflops'] / full['fwd_tflops']:.2f} fwd, {r['fwdbwd_tflops'] / full['fwdbwd_tflops']:.2f} fwd+bwd" if full else ""
            print(f"S2 N={n} G={G}: {r['fwd_tflops']:.1f} fwd, {r['fwdbwd_tflops']:.1f} fwd+bwd TFLOP/s (in-segment FLOPs){rel}")
    print(f"wrote {args.out}; torch check {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
