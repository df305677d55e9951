"""Our attention and FlashAttention-2's (torch SDPA flash) on one shape, for a profiler.

    ncu --kernel-name regex:"flash_fwd_kernel|flash_bwd_kernel|flash_bwd_dq_dk_dv" --launch-count 8 \\
        --section SpeedOfLight --section WarpStateStats --section InstructionStats ... \\
        python3 bench/attn_profile.py build/sm80/libs2attn.so [--n 4096] [--g 0] [--no-peer]

runs our forward and backward (through the library, as bench/sdpa_peer.py does) twice, then
SDPA flash's twice, on B * N = 16k tokens (B = 4 at the default N = 4k), H = 32, d = 128,
causal: four launches of each side's forward and backward kernels for the profiler to pick
(bench/NOTES.md step 24). --g gives our kernels an S2 group (the peer runs only full causal);
--no-peer leaves SDPA out. It checks and times nothing: bench/attn_sm80.sh and
tests/test_gpu_attention do that. bench/attn_stalls.sh runs the profiler on it, and
bench/attn_source.py reads the per-instruction counts of two such runs side by side (step 26).
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, "bench")
import sdpa_peer  # noqa: E402

TOKENS, H, D = 16384, 32, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lib", nargs="?", default="build/libs2attn.so")
    ap.add_argument("--n", type=int, default=4096, help="sequence length; B = 16384 / N")
    ap.add_argument("--g", type=int, default=0, help="our kernels' S2 group (0: full causal)")
    ap.add_argument("--no-peer", action="store_true", help="leave SDPA flash out")
    args = ap.parse_args()
    lib = sdpa_peer.load_ours(args.lib)
    B, N = max(1, TOKENS // args.n), args.n
    q, k, v, do = (torch.randn(B, N, H, D, device="cuda").bfloat16() for _ in range(4))  # [B, N, H, d]
    for _ in range(2):
        sdpa_peer.ours_fwd_bwd(lib, q, k, v, do, args.g)
    if not args.no_peer:
        qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # [B, H, N, d]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for _ in range(2):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                out.backward(do.transpose(1, 2))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
