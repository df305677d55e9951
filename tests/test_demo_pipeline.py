"""test_demo_pipeline.py: the demo's path on a tiny model: GGUF -> our folder -> our C stages.

Run by tests/test_demo_pipeline.sh (with $PYTHON: numpy, gguf, tokenizers). No download.

A fresh random tiny LLaMA (the one tests/test_demo_convert.py writes: D=96, H=3, Hk=1, d=32,
F=160, L=2, V=269, Q4_1/Q8_0/F16/F32 tensors, byte-level BPE with the 'smollm' pre-tokenizer)
goes through demo/convert_gguf.py (bf16, as the demo does), then:
  * ./01_tokenize --encode-file on an English text with digits, punctuation and non-ASCII
    characters gives exactly the ids of the `tokenizers` library on the converted
    tokenizer.json;
  * ./02_model --tokens (mean next-token loss, full causal attention) agrees within 1e-4
    relative with a plain numpy LLaMA forward written here (RMSNorm, HF rotate-half RoPE
    with the config's rope_theta, grouped-query causal attention, SwiGLU, tied head) run on
    the weights of the converted model.safetensors, in float64.
So the folder the converter writes is one our stages read the way transformers would.
(The check can see layout mistakes: on such a model, q/k rows left in llama.cpp's order move
the loss by about 4e-3 relative and rope_theta 1e4 instead of 54321 by about 8e-3, both far
past the 1e-4 tolerance.)
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import test_demo_convert as tiny  # noqa: E402  (the tiny GGUF writer and safetensors reader)

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. In 1813, 2 volumes cost 18s. -- said Mrs. Bennet; \"the café\" "
        "isn't theirs!\n\n  Chapter 2\n\tMr. Bennet was among the earliest of those who waited on Mr. Bingley.")


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, theta):
    """x [N, heads, d] in HF's rotate-half layout: pairs (i, i + d/2) turn by pos * theta^(-2i/d)."""
    N, _, d = x.shape
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(N)[:, None] * inv[None, :]              # [N, d/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def llama_loss(w, cfg, ids):
    D, H, Hk, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    N = len(ids)
    x = w["model.embed_tokens.weight"][ids]                 # [N, D]
    mask = np.triu(np.full((N, N), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % i
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(N, H, d), theta)
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(N, Hk, d), theta)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(N, Hk, d)
        k, v = np.repeat(k, H // Hk, axis=1), np.repeat(v, H // Hk, axis=1)   # query head j uses kv head j // (H/Hk)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(N, H * d)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    logits = x @ head.T                                      # [N, V]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(N - 1), ids[1:]].mean()


def main():
    for prog in ("01_tokenize", "02_model"):
        if not os.access(os.path.join(ROOT, prog), os.X_OK):
            print("skip: ./%s is not built (make %s)" % (prog, prog))
            return 77
    import tokenizers
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed %d" % seed)
    rng = np.random.default_rng(seed)
    tmp = tempfile.mkdtemp(prefix="test_demo_pipeline.")
    failures = 0

    for untied in (False, True):
        weights = tiny.random_model(rng, untied)
        src = os.path.join(tmp, "tiny.gguf")
        tiny.write_gguf(src, weights)
        model = os.path.join(tmp, "model-%s" % untied)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "demo", "convert_gguf.py"), src, model],
                           capture_output=True, text=True)
        if r.returncode:
            print("FAIL converter: %s" % r.stderr.strip())
            return 1

        # 01_tokenize against the tokenizers library
        text_file, tok_file = os.path.join(tmp, "text.txt"), os.path.join(tmp, "text.tok")
        open(text_file, "w", encoding="utf-8").write(TEXT)
        r = subprocess.run(["./01_tokenize", "--tokenizer", model, "--encode-file", text_file, "--out", tok_file],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            print("FAIL 01_tokenize: %s" % r.stderr.strip())
            return 1
        raw = open(tok_file, "rb").read()
        _, width, count = struct.unpack("<IIQ", raw[4:20])
        ours = np.frombuffer(raw[20:], dtype="<u2" if width == 2 else "<u4")[:count].astype(np.int64)
        ref = tokenizers.Tokenizer.from_file(os.path.join(model, "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
        if ours.tolist() != ref:
            failures += 1
            print("FAIL 01_tokenize gives %s..., tokenizers %s..." % (ours[:12].tolist(), ref[:12]))

        # 02_model against the numpy forward on the converted weights
        cfg = json.load(open(os.path.join(model, "config.json")))
        w = {k: v.astype(np.float64) for k, v in tiny.read_safetensors(os.path.join(model, "model.safetensors")).items()}
        ids = np.asarray(ref, dtype=np.int64)
        want = llama_loss(w, cfg, ids)
        r = subprocess.run(["./02_model", "--model", model, "--tokens", tok_file, "--window", str(len(ids))],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            print("FAIL 02_model: %s" % r.stderr.strip())
            return 1
        got = float(r.stdout.split()[1])
        ok = abs(got - want) <= 1e-4 * abs(want)
        failures += not ok
        print("%s %s head: %d tokens, 02_model loss %.6f, numpy %.6f" % ("PASS" if ok else "FAIL",
              "untied" if untied else "tied", len(ids), got, want))
    if tiny.failures:
        failures += len(tiny.failures)
    import shutil
    shutil.rmtree(tmp)
    if failures:
        print("%d checks failed (seed %d)" % (failures, seed))
        return 1
    print("pipeline: converted tiny GGUF tokenized by 01_tokenize like tokenizers, 02_model loss = numpy forward (tied and untied)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
