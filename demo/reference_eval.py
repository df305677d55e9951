#!/usr/bin/env python3
"""The demo's evaluation protocol, run with PyTorch + transformers as the reference.

The demo measures a model before and after LongLoRA fine-tuning, at its original context and
at 2x-4x beyond it. This script pins down exactly what is measured, so the C/CUDA inference
stage can be checked against it number for number, and it gives the "before" column (and the
PyTorch peer's numbers) for the demo's table:

  perplexity(N)  the held-out text (austen-eval.txt, Persuasion) tokenized without BOS, cut
                 into consecutive windows of N tokens from the start (at most --windows of
                 them); exp of the mean next-token cross-entropy over every predicted token
                 of every window (N - 1 per window). Full causal attention.
  passkey(N)     LongLoRA's passkey test: an instruction, filler sentences repeated to about N
                 tokens, and at a uniformly random depth "The pass key is K. Remember it. K is
                 the pass key." (K a random 5-digit number), ending with "What is the pass
                 key? The pass key is"; greedy decoding of 10 tokens; a trial passes when K
                 appears in the generated text. --trials trials per length, seeded.
  RoPE variants  "none": the model as it is (positions past its trained context are
                 extrapolated); "pi-xS": linear position interpolation, positions divided by
                 S (HF rope_type "linear"), the way LongLoRA runs a model fine-tuned for a
                 context S times the original.

Usage (a Python with torch + transformers; CUDA if there is one):
  reference_eval.py --model DIR --text austen-eval.txt --lengths 2048,4096,8192,16384,32768 \
                    --rope none,pi-x2,pi-x4 --out results.json
Writes a JSON file: {"model", "protocol", "device", "results": [{"rope", "length",
"perplexity", "windows", "passkey_accuracy", "trials", "seconds"}, ...]}.
"""
import argparse
import json
import math
import os
import random
import sys
import time

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
               "them. I will quiz you about the important information there.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tok, n_tokens, rng):
    """(prompt ids of about n_tokens, the key) with the key at a random depth."""
    key = rng.randint(10000, 99999)
    needle = " The pass key is %d. Remember it. %d is the pass key. " % (key, key)
    fixed = len(tok.encode(INSTRUCTION + needle + QUESTION, add_special_tokens=False))
    per_filler = len(tok.encode(FILLER * 10, add_special_tokens=False)) / 10
    n_filler = max(1, int((n_tokens - fixed) / per_filler))
    depth = rng.randint(0, n_filler)
    text = INSTRUCTION + FILLER * depth + needle + FILLER * (n_filler - depth) + QUESTION
    ids = tok.encode(text, add_special_tokens=False)
    return ids, key


def load_model(model_dir, rope, torch, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    theta = config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta
    if rope != "none":
        factor = float(rope.split("-x")[1])
        if hasattr(config, "rope_parameters"):  # transformers 5
            config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
        else:
            config.rope_scaling = {"type": "linear", "factor": factor}
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
    # check the interpolation took effect: inv_freq divided by the factor
    d = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    want = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if rope != "none":
        want = want / factor
    got = model.model.rotary_emb.inv_freq.double().cpu()
    if not torch.allclose(got, want, rtol=1e-5):
        sys.exit("reference_eval.py: RoPE variant %s did not take effect in transformers" % rope)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True, help="held-out text for perplexity (austen-eval.txt)")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--rope", default="none,pi-x2,pi-x4")
    ap.add_argument("--windows", type=int, default=3)
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
    print("%d eval tokens; device %s, %s" % (len(ids), device, dtype), flush=True)
    print("%-7s %7s %10s %8s %8s %7s" % ("rope", "length", "perplexity", "windows", "passkey", "secs"), flush=True)
    for rope in args.rope.split(","):
        model = load_model(args.model, rope, torch, device, dtype)
        for n in lengths:
            t0 = time.time()
            nll, count, windows = 0.0, 0, 0
            with torch.no_grad():
                for s in range(0, len(ids) - n + 1, n):
                    if windows == args.windows:
                        break
                    x = torch.tensor(ids[s:s + n], device=device).unsqueeze(0)
                    logits = model(x).logits[0, :-1].float()
                    nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
                    count += n - 1
                    windows += 1
                    del logits
            ppl = math.exp(nll / count) if count else None
            rng = random.Random("%d-%d" % (args.seed, n))
            passed = 0
            with torch.no_grad():
                for _ in range(args.trials):
                    prompt, key = passkey_prompt(tok, n, rng)
                    x = torch.tensor(prompt, device=device).unsqueeze(0)
                    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                                         pad_token_id=tok.eos_token_id)
                    passed += str(key) in tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
            r = {"rope": rope, "length": n, "perplexity": ppl, "windows": windows,
                 "passkey_accuracy": passed / args.trials if args.trials else None, "trials": args.trials,
                 "seconds": round(time.time() - t0, 1)}
            results.append(r)
            print("%-7s %7d %10s %8d %8s %7.1f" % (rope, n, "%.3f" % ppl if ppl else "-", windows,
                                                  "%d/%d" % (passed, args.trials), r["seconds"]), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    out = {"model": os.path.basename(os.path.normpath(args.model)), "protocol": "demo/reference_eval.py",
           "engine": "PyTorch %s + transformers" % torch.__version__,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype).replace("torch.", ""),
           "eval_tokens": len(ids), "results": results}
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
