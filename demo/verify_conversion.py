#!/usr/bin/env python3
"""Check a folder made by demo/convert_gguf.py against independent references.

Needs torch and transformers (not part of CI; run it by hand with a Python that has them):

  PY=python-with-torch
  $PY demo/verify_conversion.py --gguf MODEL.gguf --model CONVERTED_DIR --text LONG_ENGLISH.txt

What it checks (each line ends in PASS or FAIL; the exit status is non-zero if any fails):
  1. weights: transformers' own GGUF loader (from_pretrained(gguf_file=...), a separate
     implementation of dequantization and of the q/k un-permutation) gives the same tensors as
     our folder, within bf16 rounding (|a-b| <= 2^-8 |a| + 1e-30 per element).
  2. tokenizer: our tokenizer.json, run by the `tokenizers` library, encodes exactly like a plain
     reference BPE written here from the GGUF metadata alone (llama.cpp's two 'smollm' regexes,
     GPT-2's byte map, merges applied lowest rank first), over every line of the text and a set
     of awkward strings; decoding gives back the text; chat-template markers are single tokens.
     Also compared (reported, not required) with transformers' GGUF tokenizer conversion.
  3. perplexity on the text at 1024 and at the model's context length: must be sane (< 40);
     and with the q/k rows left in llama.cpp's order it must be clearly worse (proves the
     un-permutation is what makes the model work).
  4. generation: greedy answer to a chat prompt, printed for a human to read, and it must be
     mostly ASCII words.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

results = []


def check(name, ok, detail):
    results.append(ok)
    print("%-58s %s   %s" % (name, "PASS" if ok else "FAIL", detail), flush=True)


# ---- a reference byte-level BPE from GGUF metadata --------------------------------------------

def byte_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ReferenceBPE:
    """Encodes text the way llama.cpp's metadata says: pre-split by regexes, then BPE by merge rank."""

    def __init__(self, tokens, merges):
        import regex
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.bytemap = byte_to_unicode()
        # llama.cpp 'smollm': first "\p{N}", then GPT-2's pattern (its splitter also keeps the
        # leftover whitespace runs that Python needs the final "|\s+" alternative for).
        self.digits = regex.compile(r"\p{N}")
        self.gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
        self.cache = {}

    @staticmethod
    def split_keep(pattern, text):
        """Pieces of text: every match and every gap between matches, in order."""
        out, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        symbols = [self.bytemap[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            best = min(range(len(symbols) - 1), key=lambda i: self.rank.get((symbols[i], symbols[i + 1]), math.inf))
            pair = (symbols[best], symbols[best + 1])
            if pair not in self.rank:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab[s] for s in symbols]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        ids = []
        for piece in self.split_keep(self.digits, text):
            for word in self.split_keep(self.gpt2, piece):
                ids.extend(self.bpe(word))
        return ids


AWKWARD = ["Hello world", " Hello world", "Hello  world", "  leading and trailing  ", "\n\n\nnew\nlines\n",
           "tabs\tand\ttabs", "numbers 1234567 and 3.14159, 1,000,000", "I'm can't we'll they'd it's YOU'RE",
           "ünïcödé café naïve", "日本語のテキスト", "emoji 🙂👍🏽", "code: if (x == 1) { return y; }",
           "   ", "a", "", "Mr. Darcy's £10,000 a-year!", "\r\nwindows\r\nline ends", "x\u00a0y non-breaking"]


def check_tokenizer(gguf_path, model_dir, text):
    import gguf
    import tokenizers
    reader = gguf.GGUFReader(gguf_path, "r")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    ref = ReferenceBPE(tokens, merges)
    ours = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))

    lines = text.split("\n")
    samples = AWKWARD + lines + ["\n".join(lines[i:i + 40]) for i in range(0, min(len(lines), 4000), 40)]
    mismatches, n_tokens = [], 0
    for s in samples:
        a = ours.encode(s, add_special_tokens=False).ids
        b = ref.encode(s)
        n_tokens += len(b)
        if a != b:
            mismatches.append((s, a[:20], b[:20]))
    check("tokenizer.json == reference BPE from GGUF metadata", not mismatches,
          "%d strings, %d tokens, %d differ%s" % (len(samples), n_tokens, len(mismatches),
                                                  "" if not mismatches else "; first: %r" % (mismatches[0],)))

    bad_roundtrip = [s for s in samples if ours.decode(ours.encode(s, add_special_tokens=False).ids,
                                                       skip_special_tokens=False) != s]
    check("decode(encode(s)) == s", not bad_roundtrip,
          "%d strings%s" % (len(samples), "" if not bad_roundtrip else "; first bad: %r" % bad_roundtrip[0]))

    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = ours.encode(chat, add_special_tokens=False).ids
    check("chat markers are single special tokens", ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1,
          "ids %s" % ids)

    full_ids = ours.encode(text, add_special_tokens=False).ids
    print("    the text is %d characters, %d tokens with this tokenizer (%.2f chars/token)"
          % (len(text), len(full_ids), len(text) / max(1, len(full_ids))))

    try:  # transformers' own conversion of the GGUF tokenizer, for information
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                           gguf_file=os.path.basename(gguf_path))
        diff = sum(1 for s in samples if hf.encode(s, add_special_tokens=False) != ours.encode(s, add_special_tokens=False).ids)
        print("    (info) transformers' GGUF tokenizer differs from ours on %d of %d strings" % (diff, len(samples)))
    except Exception as e:
        print("    (info) transformers' GGUF tokenizer could not be built: %s" % e)
    return full_ids


def llama_cpp_permute(w, n_heads):
    """The row order llama.cpp writes (the inverse of what convert_gguf.py undoes)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def perplexity(model, ids, n_ctx, n_windows):
    import torch
    nll, count = 0.0, 0
    stride = max(n_ctx, (len(ids) - n_ctx) // max(1, n_windows))
    starts = [i * stride for i in range(n_windows) if i * stride + n_ctx <= len(ids)]
    with torch.no_grad():
        for s in starts:
            x = torch.tensor(ids[s:s + n_ctx]).unsqueeze(0)
            logits = model(x).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += n_ctx - 1
    return math.exp(nll / count), len(starts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=4, help="perplexity windows per length")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()

    # 1. weights against transformers' GGUF loader
    t0 = time.time()
    ours = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(args.gguf)),
                                                  gguf_file=os.path.basename(args.gguf), dtype=torch.float32)
    a_sd, b_sd = ours.state_dict(), theirs.state_dict()
    worst, worst_name, bad = 0.0, "", []
    for name, a in a_sd.items():
        b = b_sd.get(name)
        if b is None or a.shape != b.shape:
            bad.append(name)
            continue
        excess = ((a - b).abs() - (2.0 ** -8) * b.abs()).max().item()
        if excess > 0:
            bad.append(name)
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        if rel > worst:
            worst, worst_name = rel, name
    check("weights == transformers' GGUF loader (within bf16)", not bad and set(a_sd) == set(b_sd),
          "%d tensors, worst max|diff|/max|w| %.2e (%s)%s" % (len(a_sd), worst, worst_name,
                                                               "" if not bad else "; bad: %s" % bad[:3]))
    del theirs
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    print("    loaded in %.1fs; config: %d layers, D=%d, H=%d, Hk=%d, ctx %d, rope_theta %g, tied %s"
          % (time.time() - t0, cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
             cfg["num_key_value_heads"], cfg["max_position_embeddings"], cfg["rope_theta"], cfg["tie_word_embeddings"]))

    # 2. tokenizer
    ids = check_tokenizer(args.gguf, args.model, text)

    # 3. perplexity, with and without the un-permutation
    ours.eval()
    n_ctx_native = cfg["max_position_embeddings"]
    ppl = {}
    for n_ctx in (1024, n_ctx_native):
        t0 = time.time()
        p, n = perplexity(ours, ids, n_ctx, args.windows)
        ppl[n_ctx] = p
        print("    perplexity at %5d tokens: %.3f (%d windows, %.0fs)" % (n_ctx, p, n, time.time() - t0))
    check("perplexity is sane", all(p < 40 for p in ppl.values()), " ".join("%d:%.2f" % kv for kv in ppl.items()))
    with torch.no_grad():
        for layer in ours.model.layers:
            att = layer.self_attn
            att.q_proj.weight.copy_(llama_cpp_permute(att.q_proj.weight, cfg["num_attention_heads"]))
            att.k_proj.weight.copy_(llama_cpp_permute(att.k_proj.weight, cfg["num_key_value_heads"]))
    scrambled, _ = perplexity(ours, ids, 1024, args.windows)
    with torch.no_grad():  # and back (the inverse of llama.cpp's permutation, as in convert_gguf.py)
        for layer in ours.model.layers:
            for proj, h in ((layer.self_attn.q_proj, cfg["num_attention_heads"]),
                            (layer.self_attn.k_proj, cfg["num_key_value_heads"])):
                w = proj.weight
                proj.weight.copy_(w.reshape(h, w.shape[0] // h // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape))
    restored, _ = perplexity(ours, ids, 1024, args.windows)
    check("q/k left in llama.cpp's order is clearly worse", scrambled > 1.5 * ppl[1024] and abs(restored - ppl[1024]) < 1e-3 * ppl[1024],
          "perplexity at 1024: %.2f un-permuted (ours) vs %.2f llama.cpp order" % (ppl[1024], scrambled))

    # 4. generation
    tok = AutoTokenizer.from_pretrained(args.model)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    x = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = ours.generate(**x, max_new_tokens=40, do_sample=False, eos_token_id=cfg["eos_token_id"])
    answer = tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
    print("    prompt: %r\n    answer: %r" % (messages[0]["content"], answer))
    words = answer.split()
    check("generation is English words", len(words) >= 3 and sum(w.isascii() for w in words) >= 0.9 * len(words)
          and "Paris" in answer, "%d words" % len(words))

    n_fail = results.count(False)
    print("%d passed, %d failed" % (results.count(True), n_fail))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
