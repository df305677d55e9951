#!/usr/bin/env python3
"""Run our C stages on the converted demo model and compare them with the Python libraries.

Needs torch, transformers and tokenizers (not part of CI; run it by hand), and the stage
programs built (make 01_tokenize 02_model):

  $PY demo/check_c_stages.py --model CONVERTED_DIR --text LONG_ENGLISH.txt

  1. ./01_tokenize --encode-file on the whole text == the `tokenizers` library with the same
     tokenizer.json: every id identical.
  2. ./02_model --tokens (mean next-token loss over windows) == transformers' LlamaForCausalLM
     in fp32 on the same windows: relative difference <= 1e-4 (both run fp32 over the same
     bf16 weights; only the order of additions differs).
  3. ./02_model --top 20 (next-token probabilities after a prompt) == softmax of transformers'
     logits: |p_C - p_HF| <= 1e-4 for each of the 20, and the same most likely token.
"""
import argparse
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
results = []


def check(name, ok, detail):
    results.append(ok)
    print("%-52s %s   %s" % (name, "PASS" if ok else "FAIL", detail), flush=True)


def write_tokens(path, ids, vocab_size):
    """common.h's token file: "LLTK", version 1, width, count, then the ids little-endian."""
    width = 2 if vocab_size <= 65536 else 4
    with open(path, "wb") as f:
        f.write(b"LLTK" + struct.pack("<IIQ", 1, width, len(ids)))
        f.write(np.asarray(ids, dtype="<u2" if width == 2 else "<u4").tobytes())


def read_tokens(path):
    raw = open(path, "rb").read()
    assert raw[:4] == b"LLTK", "not a token file"
    version, width, n = struct.unpack("<IIQ", raw[4:20])
    return np.frombuffer(raw[20:], dtype="<u2" if width == 2 else "<u4")[:n].astype(np.int64).tolist()


def run(args):
    t0 = time.time()
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit("%s failed: %s" % (" ".join(args), r.stderr.strip()))
    return r.stdout, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args()
    import tokenizers
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(os.cpu_count() or 1)
    for prog in ("01_tokenize", "02_model"):
        if not os.access(os.path.join(ROOT, prog), os.X_OK):
            sys.exit("build the stages first: make 01_tokenize 02_model")
    tmp = tempfile.mkdtemp(prefix="check_c_stages.")

    # 1. tokenizer
    tok = tokenizers.Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    text = open(args.text, encoding="utf-8").read()
    t0 = time.time()
    ref = tok.encode(text, add_special_tokens=False).ids
    t_ref = time.time() - t0
    out = os.path.join(tmp, "text.tok")
    _, t_c = run(["./01_tokenize", "--tokenizer", args.model, "--encode-file", args.text, "--out", out])
    ours = read_tokens(out)
    first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if first is None and len(ours) != len(ref):
        first = min(len(ours), len(ref))
    check("01_tokenize == tokenizers on the whole text", first is None,
          "%d tokens (C %.1fs, tokenizers %.1fs)%s" % (len(ref), t_c, t_ref,
                                                       "" if first is None else "; first difference at token %d" % first))

    # 2. mean loss over windows
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    V = model.config.vocab_size
    W, n = args.window, args.windows
    ids = ref[:W * n]
    path = os.path.join(tmp, "windows.tok")
    write_tokens(path, ids, V)
    stdout, t_c = run(["./02_model", "--model", args.model, "--tokens", path, "--window", str(W)])
    m = re.search(r"loss ([0-9.]+) ppl ([0-9.]+) tokens (\d+)", stdout)
    c_loss = float(m.group(1))
    t0 = time.time()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), W):
            x = torch.tensor(ids[s:s + W]).unsqueeze(0)
            logits = model(x).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    hf_loss = total / count
    check("02_model loss == transformers (rel 1e-4)", abs(c_loss - hf_loss) <= 1e-4 * hf_loss and int(m.group(3)) == count,
          "%d windows of %d: C %.6f (ppl %.3f, %.1fs), HF %.6f (ppl %.3f, %.1fs)"
          % (n, W, c_loss, math.exp(c_loss), t_c, hf_loss, math.exp(hf_loss), time.time() - t0))

    # 3. next-token probabilities after a few prompts
    prompts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune,",
               "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
               "The first ten digits of pi are 3.14159"]
    for p in prompts:
        pids = tok.encode(p, add_special_tokens=False).ids
        path = os.path.join(tmp, "prompt.tok")
        write_tokens(path, pids, V)
        stdout, _ = run(["./02_model", "--model", args.model, "--tokens", path, "--top", "20"])
        rows = [line.split() for line in stdout.strip().splitlines()]
        c_top = [(int(r[1]), float(r[2])) for r in rows]
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor(pids).unsqueeze(0)).logits[0, -1].double(), -1)
        worst = max(abs(pc - probs[i].item()) for i, pc in c_top)
        same_best = c_top[0][0] == int(probs.argmax())
        check("02_model --top 20 == transformers (abs 1e-4)", worst <= 1e-4 and same_best and len(c_top) == 20,
              "%r -> %r p=%.4f, worst |dp| %.1e" % (p[:30], tok.decode([c_top[0][0]]), c_top[0][1], worst))

    print("%d passed, %d failed" % (results.count(True), results.count(False)))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
