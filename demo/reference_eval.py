#!/usr/bin/env python3
"""The demo's evaluation protocol, run with PyTorch + transformers as the reference.

The demo measures a model before and after LongLoRA fine-tuning, at its original context and
at 2x-4x beyond it. This script pins down exactly what is measured, so the C/CUDA inference
stage can be checked against it number for number, and it gives the "before" column (and the
PyTorch peer's numbers) for the demo's table:

The protocols are LongLoRA's, exactly as 06_infer.c writes them down (its sections 6 and 7),
so the C numbers and these can be compared directly, prompt for prompt:
  perplexity(N)  sliding windows over the held-out token stream (no BOS): starts 0, S, 2S,
                 ... while start < n_tokens - N, the last start dropped (LongLoRA's eval.py),
                 at most --max-windows of them; a window's loss is the mean of its N - 1
                 next-token losses; PPL = exp(mean of the window losses). S = --stride (256).
  passkey(N)     LongLoRA's passkey test: five lines joined by newlines (the task; the first
                 `depth` characters of the repeated filler; "The pass key is K. Remember it.
                 K is the pass key."; the remaining filler; "What is the pass key? The pass
                 key is"), floor(3.75 N / 1024) * 1024 filler characters, depth and K drawn
                 from common.h's generator (xoshiro256**, splitmix64-seeded, re-implemented
                 below) seeded with seed + trial, BOS first where tokenizer_config.json's
                 add_bos_token says so (absent: yes). Greedy decoding of the tokens of K
                 encoded alone plus 2; two verdicts per trial: "exact" (06_infer's rule: the
                 first run of digits in the decoded continuation is K) and "found" (K appears
                 anywhere in it).
  RoPE variants  "none": the model as it is (positions past its trained context are
                 extrapolated); "pi-xS": linear position interpolation, positions divided by
                 S (HF rope_type "linear"), the way LongLoRA runs a model fine-tuned for a
                 context S times the original; "config": the RoPE the model's config.json
                 names (a YaRN model as run.sh writes one), labelled by its type and factor
                 ("yarn-x4").

Usage (a Python with torch + transformers; CUDA if there is one):
  reference_eval.py --model DIR --text austen-eval.txt --lengths 2048,4096,8192,16384,32768 \
                    --rope none,pi-x2,pi-x4 --out results.json
Writes a JSON file: {"model", "protocol", "device", "results": [{"rope", "length",
"perplexity", "windows", "stride", "passkey_accuracy" (exact), "passkey_found", "trials",
"seconds"}, ...]}.
"""
import argparse
import json
import math
import os
import re
import sys
import time

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
MASK = (1 << 64) - 1


class Rng:
    """common.h's Rng: xoshiro256** seeded by splitmix64; below(n) = next() % n."""

    def __init__(self, seed):
        self.s, x = [], seed & MASK
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & MASK
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
            self.s.append(z ^ (z >> 31))

    def next(self):
        s = self.s
        m = (s[1] * 5) & MASK
        result = ((((m << 7) | (m >> 57)) & MASK) * 9) & MASK
        t = (s[1] << 17) & MASK
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]
        s[2] ^= t
        s[3] = ((s[3] << 45) | (s[3] >> 19)) & MASK
        return result

    def below(self, n):
        return self.next() % n if n else 0


def filler(n):
    period = FILLER + " "
    return (period * (n // len(period) + 1))[:n]


def passkey_trial(target_tokens, seed, trial):
    """(prompt text, key) for one trial, as 06_infer.c's passkey_draw and passkey_prompt."""
    n_garbage = int(3.75 * target_tokens / 1024) * 1024
    r = Rng(seed + trial)
    depth = r.below(n_garbage)
    key = 1 + r.below(49999)
    prompt = (TASK + "\n" + filler(depth) + "\nThe pass key is %d. Remember it. %d is the pass key.\n" % (key, key)
              + filler(n_garbage - depth) + "\n" + QUESTION)
    return prompt, key


def window_starts(n_tokens, seq_len, stride):
    starts = list(range(0, n_tokens - seq_len, stride)) if n_tokens > seq_len else []
    return starts[:-1]


def load_model(model_dir, rope, torch, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    theta = config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta
    if rope not in ("none", "config"):
        factor = float(rope.split("-x")[1])
        if hasattr(config, "rope_parameters"):  # transformers 5
            config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
        else:
            config.rope_scaling = {"type": "linear", "factor": factor}
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
    # check the interpolation took effect: inv_freq divided by the factor
    d = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    if rope == "config":  # transformers computes the configured RoPE itself; nothing to compare
        return model
    want = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if rope != "none":
        want = want / factor
    got = model.model.rotary_emb.inv_freq.double().cpu()
    if not torch.allclose(got, want, rtol=1e-5):
        sys.exit("reference_eval.py: RoPE variant %s did not take effect in transformers" % rope)
    return model


def config_rope_label(model_dir):
    """The RoPE a config.json names, as a label: "yarn-x4", "linear-x2", or "none"."""
    c = json.load(open(os.path.join(model_dir, "config.json")))
    r = c.get("rope_scaling") or c.get("rope_parameters") or {}
    kind = r.get("rope_type") or r.get("type") or "default"
    return "none" if kind == "default" else "%s-x%g" % (kind, r.get("factor", 1))


PROTOCOL_TARGETS = (1, 100, 512, 1000, 2048, 4321, 32768)
PROTOCOL_WINDOWS = ((1000, 100, 7), (100000, 4096, 256), (115862, 32768, 4096), (300, 300, 1), (301, 300, 1),
                    (5000, 1024, 1024))


def dump_protocol(seed):
    """--dump-protocol SEED: the prompts and windows, for tests/test_demo_protocol.c to compare
    with 06_infer.c's. Lines: "passkey TARGET TRIAL N_GARBAGE DEPTH KEY PROMPT_HEX" and
    "windows TOKENS SEQ_LEN STRIDE START...". Needs no torch."""
    for target in PROTOCOL_TARGETS:
        for trial in range(3):
            n_garbage = int(3.75 * target / 1024) * 1024
            prompt, key = passkey_trial(target, seed, trial)
            depth = Rng(seed + trial).below(n_garbage)
            print("passkey %d %d %d %d %d %s" % (target, trial, n_garbage, depth, key, prompt.encode().hex()))
    for tokens, seq_len, stride in PROTOCOL_WINDOWS:
        print(" ".join(["windows %d %d %d" % (tokens, seq_len, stride)] + [str(s) for s in window_starts(tokens, seq_len, stride)]))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--dump-protocol":
        return dump_protocol(int(sys.argv[2]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True, help="held-out text for perplexity (austen-eval.txt)")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--rope", default="none,pi-x2,pi-x4")
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok.encode(open(args.text, encoding="utf-8").read(), add_special_tokens=False)
    lengths = [int(x) for x in args.lengths.split(",")]
    results = []
    bos = tok.convert_tokens_to_ids(tok.bos_token) if tok.bos_token else None
    config_path = os.path.join(args.model, "tokenizer_config.json")
    if os.path.exists(config_path) and json.load(open(config_path)).get("add_bos_token", True) is False:
        bos = None  # as 06_infer's tokenizer_adds_bos
    print("%d eval tokens; device %s, %s; BOS %s" % (len(ids), device, dtype, bos), flush=True)
    print("%-7s %7s %10s %8s %8s %8s %7s" % ("rope", "length", "perplexity", "windows", "exact", "found", "secs"), flush=True)
    for rope in args.rope.split(","):
        model = load_model(args.model, rope, torch, device, dtype)
        if rope == "config":
            rope = config_rope_label(args.model)
        for n in lengths:
            t0 = time.time()
            starts = window_starts(len(ids), n, args.stride)[:args.max_windows]
            losses = []
            with torch.no_grad():
                for s in starts:
                    x = torch.tensor(ids[s:s + n], device=device).unsqueeze(0)
                    logits = model(x).logits[0, :-1].float()
                    losses.append(torch.nn.functional.cross_entropy(logits, x[0, 1:]).item())
                    del logits
            ppl = math.exp(sum(losses) / len(losses)) if losses else None
            exact = found = 0
            with torch.no_grad():
                for j in range(args.trials):
                    prompt, key = passkey_trial(n, args.seed, j)
                    pids = ([bos] if bos is not None else []) + tok.encode(prompt, add_special_tokens=False)
                    answer = tok.encode(str(key), add_special_tokens=False)
                    x = torch.tensor(pids, device=device).unsqueeze(0)
                    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=len(answer) + 2,
                                         do_sample=False, pad_token_id=tok.eos_token_id)[0, x.shape[1]:].tolist()
                    said = tok.decode(out, skip_special_tokens=True)
                    first = re.search(r"[0-9]+", said)
                    exact += first is not None and first.group(0) == str(key)
                    found += str(key) in said
            r = {"rope": rope, "length": n, "perplexity": ppl, "windows": len(losses), "stride": args.stride,
                 "passkey_accuracy": exact / args.trials if args.trials else None,
                 "passkey_found": found / args.trials if args.trials else None, "trials": args.trials,
                 "seconds": round(time.time() - t0, 1)}
            results.append(r)
            print("%-7s %7d %10s %8d %8s %8s %7.1f" % (rope, n, "%.4f" % ppl if ppl else "-", len(losses),
                  "%d/%d" % (exact, args.trials), "%d/%d" % (found, args.trials), r["seconds"]), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    out = {"model": os.path.basename(os.path.normpath(args.model)), "protocol": "LongLoRA eval.py / passkey_retrivial.py as in 06_infer.c",
           "engine": "PyTorch %s + transformers" % torch.__version__,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype).replace("torch.", ""),
           "eval_tokens": len(ids), "results": results}
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
