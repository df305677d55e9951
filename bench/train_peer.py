"""bench/train_peer.py: the PyTorch peer of the GPU training benchmark (bench/train_bench.c).

The same LongLoRA recipe with the ecosystem's tools: transformers' LlamaForCausalLM with a
LLaMA-2-7B shape and random weights in bf16, peft LoRA r=8 alpha 16 on q,k,v,o (peft keeps
the adapter in fp32), embed_tokens and every norm trainable (LongLoRA's "embed,norm"),
gradient checkpointing per layer, linear RoPE interpolation to N, torch's fused AdamW, and
S2-Attn by reshaping around SDPA as LongLoRA's code does it (the second half of the heads
rolled by G/2, the sequence cut into N/G groups, causal SDPA inside each; the roll lets the
first tokens of those heads see the last ones, which our kernel does not do, but the work
is the same). Batch 1, one warm-up step, then --steps timed steps (median) per length.

    python3 bench/train_peer.py --ctx 8192,16384,32768,65536,100000 --steps 2 --out bench/results/train_peer.json

Memory: max_memory_allocated (tensors), max_memory_reserved (the caching allocator) and the
device's own count of memory in use after the steps (total - free: reserved + the CUDA
context), which is what train_bench reports for ours. A length that runs out of memory is
recorded as such. The JSON is rewritten after every length.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

S2_CALLS = [0]
GROUP_RATIO = 0.25


def s2_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [B, H, N, d], key/value [B, Hk, N, d] -> ([B, N, H, d], None)."""
    S2_CALLS[0] += 1
    B, H, N, d = query.shape
    if key.shape[1] != H:  # GQA: repeat the kv heads
        rep = H // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    G = int(N * GROUP_RATIO)
    if G <= 0 or G >= N or N % G:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def shift(x):
        x = torch.cat([x[:, : H // 2], x[:, H // 2 :].roll(-(G // 2), dims=2)], dim=1)
        return x.reshape(B, H, N // G, G, d).transpose(1, 2).reshape(B * (N // G), H, G, d)

    out = F.scaled_dot_product_attention(shift(query), shift(key), shift(value), is_causal=True, scale=scaling)
    out = out.reshape(B, N // G, H, G, d).transpose(1, 2).reshape(B, H, N, d)
    out = torch.cat([out[:, : H // 2], out[:, H // 2 :].roll(G // 2, dims=2)], dim=1)
    return out.transpose(1, 2).contiguous(), None


SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--ctx", default="8192,16384,32768,65536,100000")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-s2", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global GROUP_RATIO
    if args.no_s2:
        GROUP_RATIO = 1.0

    import transformers
    import peft
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    AttentionInterface.register("s2attn", s2_attention)
    dev = torch.device("cuda")
    lens = [int(x) for x in args.ctx.split(",") if x]
    shape = SHAPES[args.shape]
    t0 = time.time()
    cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, rope_parameters={"rope_type": "linear", "factor": 1.0, "rope_theta": 10000.0},
                      attn_implementation="s2attn", use_cache=False)
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for n, p in model.named_parameters():
        if "embed_tokens" in n or "norm" in n:
            p.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    torch.cuda.synchronize()
    print(f"train_peer: torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}, "
          f"{args.shape} ready in {time.time() - t0:.1f} s, {n_train} trainable values", flush=True)
    rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]

    rows = []
    def write():
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"impl": "peer: transformers + peft + SDPA (S2 by reshaping), gradient checkpointing, fused AdamW",
                           "device": torch.cuda.get_device_name(0), "shape": args.shape, "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__, "steps_timed": args.steps,
                           "s2": not args.no_s2, "results": rows}, f, indent=2)

    print(f"{'N':<8} {'tokens/s':>12} {'alloc GiB':>10} {'reserved':>10} {'device':>10} {'loss':>8}", flush=True)
    for N in lens:
        factor = max(1.0, math.ceil(N / shape["max_position_embeddings"]))
        for r in rotary:  # position interpolation: inv_freq / factor (linear scaling)
            base = getattr(r, "_base_inv_freq", None)
            if base is None:
                base = r.inv_freq.clone()
                r._base_inv_freq = base
            r.inv_freq.copy_(base / factor)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        g = torch.Generator(device="cpu").manual_seed(N)
        ids = torch.randint(0, shape["vocab_size"], (1, N), generator=g).to(dev)
        calls0 = S2_CALLS[0]
        try:
            times, loss = [], float("nan")
            for s in range(args.steps + 1):
                torch.cuda.synchronize()
                a = time.time()
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss = out.loss.item()
                del out
                torch.cuda.synchronize()
                times.append(time.time() - a)
            free_b, total_b = torch.cuda.mem_get_info()
            med = sorted(times[1:])[len(times[1:]) // 2]
            row = {"N": N, "fits": True, "tokens_per_s": N / med, "step_s_median": med,
                   "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                   "device_used_gib": (total_b - free_b) / 2**30, "loss": loss, "s2_attention_calls": S2_CALLS[0] - calls0}
            print(f"{N:<8} {row['tokens_per_s']:>12.0f} {row['max_allocated_gib']:>10.2f} {row['max_reserved_gib']:>10.2f} "
                  f"{row['device_used_gib']:>10.2f} {loss:>8.4f}", flush=True)
        except torch.OutOfMemoryError as e:
            row = {"N": N, "fits": False, "error": "out of memory: " + str(e).split("\n")[0][:200]}
            print(f"{N:<8} out of memory", flush=True)
            out = None
            opt.zero_grad(set_to_none=True)
        rows.append(row)
        write()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
