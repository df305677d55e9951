#!/usr/bin/env bash
# The backward's version 3b (04_s2attn.cu backward variants 4-6, bench/NOTES.md step 12),
# checked and then timed (from the repository root, on the GPU machine):
#   bash bench/bwd_device.sh [OUTDIR]
# bench/attn_device.sh with KERNEL=bwd: the build, tests/test_gpu_attention and the sanitizers
# (PARTS=check), then ./04_s2attn --variants at d = 128 and 64 and --bench at d = 128 with
# backward variants 3 (the default before step 12), 4, 5 and 6, bench/sdpa_peer.py checking
# variant BWD_CHECK (default 5) in the same call, and the table (PARTS=time). On the H200 the
# check took about 1 minute and the timing about 8: two device calls.
KERNEL=bwd BENCH="128:3 128:4 128:5 128:6" CHECK=${BWD_CHECK:-5} exec bash "$(dirname "$0")/attn_device.sh" "$@"
