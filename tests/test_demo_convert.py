"""test_demo_convert.py: demo/convert_gguf.py on tiny GGUF files this test writes itself.

Run by tests/test_demo_convert.sh (with $PYTHON). Needs numpy, gguf and tokenizers
(tests/requirements.txt); no torch, no download.

A fresh random tiny LLaMA (D=96, H=3 heads of d=32, Hk=1 kv head, F=160, L=2, V=269: no
dimension a power of two) is written as GGUF the way llama.cpp writes one:
  * q_proj / k_proj rows in llama.cpp's order, built here from its definition (per head,
    HF row i -> GGUF row 2i and HF row i + d/2 -> GGUF row 2i+1), one row at a time;
  * layer 0's projections Q4_1, layer 1's Q8_0 except k_proj (F32) and q_proj (F16), the
    embedding Q8_0, norms F32; a second file is untied, with an output.weight in Q4_1;
  * llama.* metadata with values that differ from every default, a byte-level BPE
    tokenizer (256 byte tokens, 3 control tokens, 7 merges) with tokenizer.ggml.pre smollm.
The converter's output must match the original fp32 weights within the quantization error,
bounded per 32-value block (Q4_1: half a step (max-min)/15 plus 2^-11 of (max-min) + |min|
for its fp16 scale and minimum; Q8_0: half a step amax/127 plus 2^-11 amax for its fp16
scale; F16: 2^-11 relative; F32: exact), for --dtype fp32 and, with 2^-8 relative added for bf16 rounding, the default bf16.
The same check against the rows *not* un-permuted must fail (the test can see a wrong order).
config.json must carry every metadata value; tokenizer.json, run by `tokenizers`, must
encode a string to ids worked out by hand from the merges. Broken inputs (truncated file,
non-LLaMA architecture, a wrong tensor shape, a missing tensor, a block count of 2^31 - 1) must end with one line on
stderr and no output folder; 200 randomly corrupted files must each convert or be refused with
the converter's own error, never another exception (under an 8 GiB address-space limit, so a
header that makes it allocate without bound fails as a MemoryError); converting twice into one
folder must replace it cleanly. TEST_SEED=N repeats a run; TEST_KEEP_MUTATION=PREFIX keeps each
corrupted file as PREFIX.<trial>.
"""
import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

try:
    import gguf
    from gguf import quants
except ImportError:
    print("skip: the gguf package is missing (pip install -r tests/requirements.txt)")
    sys.exit(77)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(ROOT, "demo", "convert_gguf.py")
Q = gguf.GGMLQuantizationType
failures = []


def expect(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL", what)


# ---- the tiny model -------------------------------------------------------------------------
D, H, Hk, d, F, L = 96, 3, 1, 32, 160, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "t he", "i s", "Ġ is", "m e"]


def gpt2_byte_chars():
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


TOKENS = SPECIALS + gpt2_byte_chars() + [m.replace(" ", "") for m in MERGES]
V = len(TOKENS)  # 3 + 256 + 7 = 266 ... plus 3 unused tokens below, so V is 269
TOKENS += ["<unused0>", "<unused1>", "<unused2>"]
V = len(TOKENS)
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (V - len(SPECIALS))


def random_model(rng, untied):
    def lin(out_f, in_f):  # rows with different scales and offsets, so blocks differ
        return (rng.standard_normal((out_f, in_f)) * rng.uniform(0.02, 0.2, (out_f, 1))
                + rng.uniform(-0.05, 0.05, (out_f, 1))).astype(np.float32)
    w = {"model.embed_tokens.weight": lin(V, D),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)}
    for i in range(L):
        p = "model.layers.%d." % i
        w[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[p + "self_attn.q_proj.weight"] = lin(H * d, D)
        w[p + "self_attn.k_proj.weight"] = lin(Hk * d, D)
        w[p + "self_attn.v_proj.weight"] = lin(Hk * d, D)
        w[p + "self_attn.o_proj.weight"] = lin(D, H * d)
        w[p + "mlp.gate_proj.weight"] = lin(F, D)
        w[p + "mlp.up_proj.weight"] = lin(F, D)
        w[p + "mlp.down_proj.weight"] = lin(D, F)
    if untied:
        w["lm_head.weight"] = lin(V, D)
    return w


def to_llama_cpp_rows(w, n_heads):
    """llama.cpp's q/k row order, from its definition, one row at a time."""
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + i + d // 2]
    return out


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(hf):
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    parts = hf.split(".")
    return "blk.%s.%s.weight" % (parts[2], LAYER_NAMES[".".join(parts[3:-1])])


def storage_type(hf):
    if hf.endswith("norm.weight"):
        return Q.F32
    if hf == "model.embed_tokens.weight":
        return Q.Q8_0
    if hf == "lm_head.weight":
        return Q.Q4_1
    if ".layers.0." in hf:
        return Q.Q4_1
    if hf.endswith("k_proj.weight"):
        return Q.F32
    if hf.endswith("q_proj.weight"):
        return Q.F16
    return Q.Q8_0


def write_gguf(path, weights, arch="llama", skip=(), bad_shape=()):
    wr = gguf.GGUFWriter(path, arch)
    wr.add_uint32("%s.block_count" % arch, L)
    wr.add_uint32("%s.context_length" % arch, 3000)
    wr.add_uint32("%s.embedding_length" % arch, D)
    wr.add_uint32("%s.feed_forward_length" % arch, F)
    wr.add_uint32("%s.attention.head_count" % arch, H)
    wr.add_uint32("%s.attention.head_count_kv" % arch, Hk)
    wr.add_float32("%s.rope.freq_base" % arch, 54321.0)
    wr.add_float32("%s.attention.layer_norm_rms_epsilon" % arch, 3e-6)
    wr.add_uint32("%s.rope.dimension_count" % arch, d)
    wr.add_uint32("%s.vocab_size" % arch, V)
    wr.add_string("tokenizer.ggml.model", "gpt2")
    wr.add_string("tokenizer.ggml.pre", "smollm")
    wr.add_array("tokenizer.ggml.tokens", TOKENS)
    wr.add_array("tokenizer.ggml.token_type", TOKEN_TYPES)
    wr.add_array("tokenizer.ggml.merges", MERGES)
    wr.add_uint32("tokenizer.ggml.bos_token_id", 1)
    wr.add_uint32("tokenizer.ggml.eos_token_id", 2)
    wr.add_uint32("tokenizer.ggml.padding_token_id", 0)
    wr.add_string("tokenizer.chat_template", "{{ messages }}")
    stored = {}  # what the file holds, dequantized, in HF row order: the reference
    for hf, w in weights.items():
        if hf in skip:
            continue
        if hf.endswith("q_proj.weight"):
            rows = to_llama_cpp_rows(w, H)
        elif hf.endswith("k_proj.weight"):
            rows = to_llama_cpp_rows(w, Hk)
        else:
            rows = w
        if hf in bad_shape:
            rows = rows[:-32]
        qt = storage_type(hf)
        if qt == Q.F32:
            wr.add_tensor(gguf_name(hf), np.ascontiguousarray(rows))
        elif qt == Q.F16:
            wr.add_tensor(gguf_name(hf), rows.astype(np.float16))
        else:
            wr.add_tensor(gguf_name(hf), quants.quantize(rows, qt), raw_dtype=qt)  # shape from the byte rows
        stored[hf] = qt
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return stored


# ---- reading the output ---------------------------------------------------------------------
def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    base, out, end = 8 + n, {}, 0
    expect((8 + n) % 8 == 0, "safetensors data starts 8-byte aligned")
    for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0] if kv[0] != "__metadata__" else -1):
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        expect(a == end, "%s: tensors are packed without gaps" % name)
        end = b
        blob = raw[base + a:base + b]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(blob, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            expect(info["dtype"] == "F32", "%s: dtype %s" % (name, info["dtype"]))
            arr = np.frombuffer(blob, dtype="<f4")
        out[name] = arr.reshape(info["shape"])
    expect(base + end == len(raw), "safetensors file has no trailing bytes")
    return out


def block_tolerance(w, qt):
    """Per-element bound on |dequantize(quantize(w)) - w| for GGUF type qt (blocks of 32 along rows)."""
    if qt == Q.F32:
        return np.zeros_like(w)
    if qt == Q.F16:
        return np.abs(w) * 2.0 ** -11 + 1e-7
    # Rounding to the nearest level costs half a step; the fp16 copies of the scale (and of
    # Q4_1's minimum) cost 2^-11 relative each, times the largest level they multiply.
    blocks = w.reshape(w.shape[0], -1, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    if qt == Q.Q4_1:
        lo = blocks.min(axis=2, keepdims=True)
        step = (blocks.max(axis=2, keepdims=True) - lo) / 15
        tol = 0.5 * step + 2.0 ** -11 * (15 * step + np.abs(lo))
    else:
        step = amax / 127
        tol = 0.5 * step + 2.0 ** -11 * 127 * step
    tol = tol + 1e-6 * amax + 1e-9  # fp32 arithmetic in the quantizer
    return np.broadcast_to(tol, blocks.shape).reshape(w.shape)


def run_converter(src, dst, *extra):
    return subprocess.run([sys.executable, CONVERTER, src, dst, *extra], capture_output=True, text=True)


def check_weights(label, got, weights, stored, dtype):
    expect(set(got) == set(stored), "%s: tensor names %s" % (label, sorted(set(got) ^ set(stored))))
    worst = 0.0
    for hf, qt in stored.items():
        if hf not in got:
            continue
        w = weights[hf]
        expect(got[hf].shape == w.shape, "%s: %s shape %s, want %s" % (label, hf, got[hf].shape, w.shape))
        if got[hf].shape != w.shape:
            continue
        tol = block_tolerance(w, qt) if w.ndim == 2 else np.zeros_like(w)
        if dtype == "bf16":
            tol = tol + 2.0 ** -8 * np.abs(w)
        err = np.abs(got[hf] - w)
        ok = bool(np.all(err <= tol))
        expect(ok, "%s: %s (%s) off by %.3g, tolerance there %.3g"
               % (label, hf, qt.name, float(err.max()), float(tol.flat[np.argmax(err - tol)])))
        worst = max(worst, float((err / np.maximum(tol, 1e-30)).max()) if tol.any() else 0.0)
        if qt == Q.F32 and dtype == "fp32":
            expect(np.array_equal(got[hf], w), "%s: %s is F32 and must come back exactly" % (label, hf))
        if hf.endswith(("q_proj.weight", "k_proj.weight")):  # the same test must see a wrong row order
            n_heads = H if hf.endswith("q_proj.weight") else Hk
            wrong = to_llama_cpp_rows(w, n_heads)
            expect(not np.all(np.abs(got[hf] - wrong) <= tol),
                   "%s: %s would also pass in llama.cpp's row order: the check is blind" % (label, hf))
    print("  %s: %d tensors within tolerance (worst error / tolerance %.2f)" % (label, len(stored), worst))


def main():
    seed = int(os.environ["TEST_SEED"]) if os.environ.get("TEST_SEED") else int.from_bytes(os.urandom(4), "little")
    print("seed %d" % seed)
    rng = np.random.default_rng(seed)
    tmp = tempfile.mkdtemp(prefix="test_demo_convert.")

    for untied in (False, True):
        weights = random_model(rng, untied)
        src = os.path.join(tmp, "tiny%s.gguf" % ("-untied" if untied else ""))
        stored = write_gguf(src, weights)
        for dtype in ("fp32", "bf16"):
            label = "%s %s" % ("untied" if untied else "tied", dtype)
            dst = os.path.join(tmp, "out-%s-%s" % (untied, dtype))
            r = run_converter(src, dst, "--dtype", dtype)
            expect(r.returncode == 0, "%s: converter failed: %s" % (label, r.stderr.strip()))
            if r.returncode:
                continue
            got = read_safetensors(os.path.join(dst, "model.safetensors"))
            check_weights(label, got, weights, stored, dtype)
            cfg = json.load(open(os.path.join(dst, "config.json")))
            want = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
                    "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H,
                    "num_key_value_heads": Hk, "head_dim": d, "vocab_size": V, "max_position_embeddings": 3000,
                    "rope_theta": 54321.0, "rms_norm_eps": 3e-6, "tie_word_embeddings": not untied,
                    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
                    "torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
            bad = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
            expect(not bad, "%s: config.json differs (got, want): %s" % (label, bad))
            tcfg = json.load(open(os.path.join(dst, "tokenizer_config.json")))
            expect(tcfg.get("bos_token") == "<|im_start|>" and tcfg.get("eos_token") == "<|im_end|>"
                   and tcfg.get("chat_template") == "{{ messages }}", "%s: tokenizer_config.json %s" % (label, tcfg))

    # tokenizer.json with the tokenizers library, against ids worked out by hand:
    #   "the"    t h e -> (h,e) rank 1 -> t he -> (t,he) rank 3 -> the
    #   " theme" Ġ t h e m e -> Ġt h e m e -> Ġt he m e -> Ġthe m e -> Ġthe me
    #   " is"    Ġ i s -> Ġ is -> Ġis;  " " -> Ġ;  "42" -> "4" "2" (each digit alone)
    try:
        import tokenizers
    except ImportError:
        expect(False, "the tokenizers package is missing (tests/requirements.txt installs it)")
    else:
        tok = tokenizers.Tokenizer.from_file(os.path.join(tmp, "out-False-fp32", "tokenizer.json"))
        vocab = {t: i for i, t in enumerate(TOKENS)}
        text = "the theme is 42<|im_end|>"
        want = [vocab[t] for t in ["the", "Ġthe", "me", "Ġis", "Ġ", "4", "2", "<|im_end|>"]]
        got = tok.encode(text, add_special_tokens=False).ids
        expect(got == want, "tokenizer: %r -> %s, want %s" % (text, got, want))
        expect(tok.decode(got, skip_special_tokens=False) == text, "tokenizer: decode does not give the text back")
        print("  tokenizer: %r -> %s" % (text, got))

    # hostile inputs: one line on stderr, non-zero exit, no output folder. A header that makes
    # the converter allocate without bound must fail here (MemoryError, in the converter run
    # as a subprocess or in-process below), not take the machine's memory: 8 GiB of address space
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    weights = random_model(rng, False)
    good = os.path.join(tmp, "good.gguf")
    write_gguf(good, weights)
    raw = open(good, "rb").read()
    cases = {}
    cases["truncated"] = os.path.join(tmp, "truncated.gguf")
    open(cases["truncated"], "wb").write(raw[:len(raw) // 3])
    cases["not gguf"] = os.path.join(tmp, "zeros.gguf")
    open(cases["not gguf"], "wb").write(b"\0" * 4096)
    cases["gpt2 arch"] = os.path.join(tmp, "gpt2.gguf")
    write_gguf(cases["gpt2 arch"], weights, arch="gpt2")
    cases["missing tensor"] = os.path.join(tmp, "missing.gguf")
    write_gguf(cases["missing tensor"], weights, skip=("model.layers.1.mlp.up_proj.weight",))
    cases["wrong shape"] = os.path.join(tmp, "shape.gguf")
    write_gguf(cases["wrong shape"], weights, bad_shape=("model.layers.0.mlp.gate_proj.weight",))
    # llama.block_count set to 2^31 - 1 in place (a GGUF key/value: the key, a u32 type, the value)
    cases["huge block count"] = os.path.join(tmp, "layers.gguf")
    at = raw.find(b"llama.block_count") + len(b"llama.block_count")
    vtype = struct.unpack("<I", raw[at:at + 4])[0]
    assert vtype in (4, 10), vtype  # GGUF's UINT32 or UINT64
    huge = struct.pack("<I", 0x7FFFFFFF) if vtype == 4 else struct.pack("<Q", 0x7FFFFFFF)
    open(cases["huge block count"], "wb").write(raw[:at + 4] + huge + raw[at + 4 + len(huge):])
    cases["absent file"] = os.path.join(tmp, "no-such-file.gguf")
    for what, path in cases.items():
        dst = os.path.join(tmp, "bad-out")
        r = run_converter(path, dst)
        lines = r.stderr.strip().splitlines()
        expect(r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr and path in lines[0],
               "%s: want one error line naming the file, got exit %d and %r" % (what, r.returncode, r.stderr[-400:]))
        expect(not os.path.exists(dst), "%s: a failed conversion left %s behind" % (what, dst))
        print("  %-15s -> %s" % (what, lines[-1] if lines else "(nothing)"))

    # corrupted files (random bytes changed, mostly in the header and metadata): the converter,
    # called in-process, must either succeed or raise its own ConvertError, nothing else
    sys.path.insert(0, os.path.dirname(CONVERTER))
    import convert_gguf
    crashes, refused = [], 0
    for trial in range(200):
        b = bytearray(raw)
        for _ in range(rng.integers(1, 4)):
            where = int(rng.integers(0, 4096 if rng.random() < 0.7 else len(b)))
            b[where] = int(rng.integers(0, 256))
        path = os.path.join(tmp, "mutated.gguf")
        open(path, "wb").write(bytes(b))
        if os.environ.get("TEST_KEEP_MUTATION"): open(os.environ["TEST_KEEP_MUTATION"] + ".%d" % trial, "wb").write(bytes(b))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                convert_gguf.convert(path, os.path.join(tmp, "mutated-out"), "fp32")
        except convert_gguf.ConvertError:
            refused += 1
        except Exception as e:  # anything else would reach the user as a traceback
            crashes.append("%s: %s" % (type(e).__name__, e))
    expect(not crashes, "%d of 200 corrupted files crashed the converter, e.g. %s" % (len(crashes), crashes[:1]))
    print("  200 corrupted files: %d refused with a message, %d converted, %d crashed" % (refused, 200 - refused - len(crashes), len(crashes)))

    # converting twice into one folder replaces it and leaves no temporary folders
    dst = os.path.join(tmp, "twice")
    ok = run_converter(good, dst).returncode == 0 and run_converter(good, dst, "--dtype", "fp32").returncode == 0
    cfg = json.load(open(os.path.join(dst, "config.json"))) if ok else {}
    expect(ok and cfg.get("torch_dtype") == "float32", "converting twice into one folder")
    leftovers = [n for n in os.listdir(tmp) if ".tmp-" in n or ".old-" in n]
    expect(not leftovers, "temporary folders left behind: %s" % leftovers)

    import shutil
    shutil.rmtree(tmp)
    if failures:
        print("%d checks failed (seed %d)" % (len(failures), seed))
        return 1
    print("converter: tied/untied x fp32/bf16 weights within quantization tolerance, q/k order, config, tokenizer, %d bad inputs: all pass" % len(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
