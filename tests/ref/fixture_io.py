"""The reference-array files the C tests read (tests/fixture.h), one writer for every script.

Format (little-endian): a 4-byte magic naming the fixture family ("INFX" inference, "LRFX"
LoRA, "LLMF" model), u32 version = 1, u32 count, then per array: u32 name length, the name's bytes,
u32 dtype (0 = f32, 1 = i32, 2 = f64), u32 ndim (at most 4), u64 dims[ndim], the values.
"""
import struct

import numpy as np


def write_fixture(path, magic, tensors, keep_f64):
    """tensors: [(name, array)]. Float arrays become f32 (float64 ones stay f64 where keep_f64),
    everything else i32."""
    assert len(magic) == 4
    with open(path, "wb") as f:
        f.write(magic + struct.pack("<II", 1, len(tensors)))
        for name, arr in tensors:
            arr = np.ascontiguousarray(arr)
            assert arr.ndim <= 4, name
            if keep_f64 and arr.dtype == np.float64:
                code, arr = 2, arr.astype("<f8")
            elif arr.dtype.kind == "f":
                code, arr = 0, arr.astype("<f4")
            else:
                code, arr = 1, arr.astype("<i4")
            nb = name.encode()
            f.write(struct.pack("<I", len(nb)) + nb + struct.pack("<II", code, arr.ndim))
            f.write(struct.pack("<%dQ" % arr.ndim, *arr.shape))
            f.write(arr.tobytes())
