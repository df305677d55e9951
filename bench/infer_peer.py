"""The peer for the inference benchmark: HF transformers' LlamaForCausalLM with SDPA attention,
random bf16 weights of the same shape (LLaMA-2-7B by default), on the same GPU, in the same run.

Run after ours on a GPU machine with torch and transformers:
    ./06_infer --init random --shape llama2-7b --device gpu --bench --bench-out bench/results/infer_ours.json
    python bench/infer_peer.py --ours bench/results/infer_ours.json --out bench/results/infer_hf.json

What is measured (the same as 06_infer --bench):
  prefill: one forward over 32768 tokens with an empty cache, keeping only the last
           position's logits (what generate's first step does); the better of two runs with
           SDPA's default backend choice (cuDNN on an H100 with torch 2.11), and one run
           with SDPA held to its flash backend, for reference;
  decode:  generate(max_new_tokens = 65) minus generate(max_new_tokens = 1) on the same
           prompt of 4096 (then 32768) tokens, greedy, HF's default dynamic cache: the time of
           64 decode steps, as tokens/s.
Ours decodes 64 steps after a prefill of the same length. Prints both and writes JSON.
"""
import argparse
import json
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)}


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def best_ms(fn, reps=3):
    fn()
    best = float("inf")
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1))
    return best


def layer_breakdown(model, T):
    """torch's pieces of one layer at T rows, timed alone: the 7 projections (F.linear, as HF
    calls them) and SDPA causal with the default backend choice, flash and cuDNN."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    layer = model.model.layers[0]
    D = model.config.hidden_size
    x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
    a, m = layer.self_attn, layer.mlp
    out = {}
    with torch.no_grad():
        def gemms():
            for w in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
                F.linear(x, w.weight)
            g, u = F.linear(x, m.gate_proj.weight), F.linear(x, m.up_proj.weight)
            F.linear(g, m.down_proj.weight)
        out["projections"] = round(best_ms(gemms), 3)
        H, d = model.config.num_attention_heads, D // model.config.num_attention_heads
        q, k, v = (torch.randn(1, H, T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out["attention_sdpa_default"] = round(best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), 3)
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    out["attention_sdpa_" + name] = round(best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), 3)
            except RuntimeError as err:
                out["attention_sdpa_" + name] = str(err).splitlines()[0][:80]
    print("peer: one layer at %d rows (ms): %s" % (T, out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--prefill", type=int, default=32768)
    ap.add_argument("--decode-contexts", default="4096,32768")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--ours", default=None, help="JSON written by 06_infer --bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    long_ctx = max([args.prefill] + [int(x) for x in args.decode_contexts.split(",")])
    cfg = LlamaConfig(**SHAPES[args.shape], rope_scaling={"rope_type": "linear", "factor": float(-(-long_ctx // 4096))},
                      attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    model.eval()
    print(f"peer: transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"model ready in {time.perf_counter() - t0:.1f} s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, long_ctx), device="cuda", generator=gen)

    with torch.no_grad():
        model(ids[:, :512], logits_to_keep=1)  # warm-up
        best = 0.0
        for _ in range(2):
            dt, _ = timed(lambda: model(ids[:, :args.prefill], use_cache=True, logits_to_keep=1))
            best = max(best, args.prefill / dt)
        print(f"peer: prefill of {args.prefill} tokens: {best:.0f} tokens/s", flush=True)
        # the same with SDPA held to its flash backend (the default above may pick cuDNN)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            dt, _ = timed(lambda: model(ids[:, :args.prefill], use_cache=True, logits_to_keep=1))
        best_flash = args.prefill / dt
        print(f"peer: prefill of {args.prefill} tokens, SDPA flash backend only: {best_flash:.0f} tokens/s", flush=True)
        decode = {}
        for ctx in [int(x) for x in args.decode_contexts.split(",")]:
            p = ids[:, :ctx]
            kw = dict(do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
            t1, _ = timed(lambda: model.generate(p, max_new_tokens=1, min_new_tokens=1, **kw))
            tn, out = timed(lambda: model.generate(p, max_new_tokens=args.steps + 1, min_new_tokens=args.steps + 1, **kw))
            assert out.shape[1] == ctx + args.steps + 1
            decode[str(ctx)] = args.steps / (tn - t1)
            print(f"peer: decode at {ctx} context: {decode[str(ctx)]:.1f} tokens/s", flush=True)
            torch.cuda.empty_cache()

    breakdown = layer_breakdown(model, args.prefill)

    peer = {"impl": "hf-transformers-sdpa", "device": torch.cuda.get_device_name(), "shape": args.shape, "dtype": "bf16",
            "transformers": transformers.__version__, "torch": torch.__version__, "prefill_tokens": args.prefill,
            "prefill_tokens_per_s": round(best, 1), "prefill_tokens_per_s_sdpa_flash_only": round(best_flash, 1),
            "decode_steps": args.steps,
            "decode_tokens_per_s": {k: round(v, 2) for k, v in decode.items()}, "layer_ms_at_prefill": breakdown}
    result = {"peer": peer}
    if args.ours:
        with open(args.ours) as f:
            ours = json.load(f)
        result["ours"] = ours
        print(f"\n{'':28s} {'ours':>12s} {'HF+SDPA':>12s} {'ratio':>8s}")
        rows = [("prefill tokens/s @%d" % args.prefill, ours["prefill_tokens_per_s"], peer["prefill_tokens_per_s"])]
        for k, v in peer["decode_tokens_per_s"].items():
            rows.append(("decode tokens/s @%s" % k, ours["decode_tokens_per_s"].get(k, float("nan")), v))
        for name, a, b in rows:
            print(f"{name:28s} {a:12.1f} {b:12.1f} {a / b:8.2f}")
        result["at_least_peer"] = all(a >= b for _, a, b in rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
