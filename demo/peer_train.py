#!/usr/bin/env python3
"""The demo's fine-tune again, with transformers + peft + torch AdamW: the PyTorch peer of 05_train.

What it teaches: LongLoRA's recipe as a PyTorch user writes it, step for step the one 05_train
runs, so the two can be compared on the same model, data and GPU:
  data       the token file 05_train reads (01_tokenize's LLTK file), cut into sequences
             k = stream[kN, kN+N) with targets stream[kN+1, kN+N+1), n = (len - 1) // N of them,
             read in 05_data.c's order: a Fisher-Yates shuffle drawn from common.h's generator
             (reference_eval.Rng) seeded with seed ^ 0xda7a5eedda7a5eed, reshuffled each epoch
  RoPE       linear position interpolation to N (rope_type "linear", factor ceil(N / original))
  S2-Attn    G = N * group_ratio (N / 4): query heads h < H/2 attend causally inside [kG, (k+1)G),
             the others inside [0, S), [S, S+G), ..., [S+(N/G-1)G, N) with S = G/2 (common.h's
             s2_first_key: no wrap-around), each group one causal SDPA call; full causal
             attention when the model is not training
  LoRA+      LoRA r on q,k,v,o (peft; alpha, no dropout), embed_tokens and every RMSNorm trained
             (a tied head is the embedding, trained with it)
  AdamW      torch.optim.AdamW (betas, eps, weight decay off the norms as HF's Trainer groups
             them), get_constant_schedule_with_warmup (the first step has lr 0), optional
             clip_grad_norm_, one sequence per step
  ablations  --schedule cosine|linear (decay after the warmup), --train lora|lora+norms|lora+embed
             (05_train's --lr-scheduler and --no-train-embed / --no-train-norms; the demo
             trains lora+norms)
Runs on: CUDA (fp32 masters, bf16 autocast, activations recomputed in the backward pass as
LongLoRA's fine-tune does; --no-checkpointing keeps them: faster, and 47.8 GiB at 32k on the
H200, where 05_train holds 4.6 GiB)
or the CPU (fp32 or fp64, for tests/test_demo_peer.sh on a tiny model; --checkpointing).
Leaves out: batches of several sequences, gradient accumulation, SFT data (the demo needs none).

Usage:
  peer_train.py --model DIR --data train.tok --ctx 32768 --steps 300 --lr 2e-4 --warmup 20 --out OUT
Writes OUT/train_log.csv (05_train's columns), OUT/run.json (wall time, peak GPU memory),
OUT/merged/ (the model with the adapter merged in: an HF folder for reference_eval.py) and,
with --dump, OUT/dump.safetensors (step 1's gradients and the trainable tensors at the end,
under 05_train's names) and OUT/order.txt (the sequences in the order they were read).
"""
import argparse
import csv
import json
import math
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_eval import Rng  # common.h's generator, written once for the demo's Python


def die(msg):
    sys.exit("peer_train.py: " + msg)


def read_tokens(path):
    """An LLTK token file (common.h's format) as a list of ids."""
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:4] != b"LLTK":
            die("%s is not a token file (no LLTK header)" % path)
        version, width, count = struct.unpack("<IIQ", head[4:])
        if version != 1 or width not in (2, 4):
            die("%s: token file version %d width %d is not one this script reads" % (path, version, width))
        body = f.read()
    if len(body) != count * width:
        die("%s holds %d bytes of ids, its header says %d tokens of %d bytes" % (path, len(body), count, width))
    import array
    ids = array.array("H" if width == 2 else "I")
    ids.frombytes(body)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids


class Order:
    """05_data.c's sequence order: Fisher-Yates over 0..n-1, one shuffle per epoch."""

    def __init__(self, n_seqs, seed):
        self.n, self.rng = n_seqs, Rng(seed ^ 0xDA7A5EEDDA7A5EED)
        self.pos = 0
        self.shuffle()

    def shuffle(self):
        self.order = list(range(self.n))
        for i in range(self.n, 1, -1):
            j = self.rng.below(i)
            self.order[i - 1], self.order[j] = self.order[j], self.order[i - 1]

    def next(self):
        if self.pos == self.n:
            self.pos = 0
            self.shuffle()
        self.pos += 1
        return self.order[self.pos - 1]


S2_GROUP = [0]  # G of the running training (0: full attention); set by main()


def s2_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers attention function: S2-Attn while training, full causal attention otherwise.
    query [B, H, N, d]; key, value [B, Hk, N, d] with RoPE applied at global positions.
    Returns [B, N, H, d] and no weights."""
    import torch
    import torch.nn.functional as F
    B, H, N, d = query.shape
    rep = H // key.shape[1]
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    G = S2_GROUP[0]
    if not module.training or G == 0 or G >= N:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def causal_groups(q, k, v, g):
        # [B, h, n, d] with n a multiple of g -> causal attention inside each run of g tokens
        b, h, n, _ = q.shape
        shape = (b, h * (n // g), g, d)
        o = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), is_causal=True, scale=scaling)
        return o.reshape(b, h, n, d)

    half, S = H // 2, G // 2
    q0, k0, v0 = (t[:, :half].contiguous() for t in (query, key, value))
    q1, k1, v1 = (t[:, half:].contiguous() for t in (query, key, value))
    plain = causal_groups(q0, k0, v0, G)
    last = G - S  # the shifted heads' last segment [N - (G - S), N)
    parts = [causal_groups(q1[:, :, S:N - last], k1[:, :, S:N - last], v1[:, :, S:N - last], G),
             causal_groups(q1[:, :, N - last:], k1[:, :, N - last:], v1[:, :, N - last:], last)]
    if S > 0:  # G = 1 has no short first segment
        parts.insert(0, causal_groups(q1[:, :, :S], k1[:, :, :S], v1[:, :, :S], S))
    shifted = torch.cat(parts, dim=2)
    return torch.cat([plain, shifted], dim=1).transpose(1, 2).contiguous(), None


def our_name(peft_name):
    """peft's parameter name -> 05_train's (and the adapter's) tensor name."""
    return peft_name.replace("base_model.model.", "", 1).replace(".default", "")


def main():
    ap = argparse.ArgumentParser(description="LongLoRA fine-tune with transformers + peft + torch AdamW (05_train's recipe)")
    ap.add_argument("--model", required=True, help="HuggingFace folder (the demo's converted SmolLM2)")
    ap.add_argument("--data", required=True, help="the token file 05_train reads (01_tokenize --encode-file ... --out)")
    ap.add_argument("--ctx", type=int, required=True, help="sequence length N = the extended context")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--betas", default="0.9,0.95")
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=0.0, help="clip the global gradient norm (0: off)")
    ap.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="constant",
                    help="after the warmup: constant (05_train's, LongLoRA's), or HF's cosine / linear decay to 0")
    ap.add_argument("--train", choices=("lora+embed+norms", "lora+norms", "lora+embed", "lora"), default="lora+embed+norms",
                    help="what trains: LoRA+ (05_train's) or a part of it, for ablations")
    ap.add_argument("--group-ratio", type=float, default=0.25, help="S2-Attn G = N * ratio (1: full attention)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=42, help="the data order (05_train's --seed)")
    ap.add_argument("--adapter", help="start from this PEFT adapter (as 05_train --adapter) instead of peft's init")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--dtype", choices=("bf16", "fp32", "fp64"), default=None,
                    help="compute precision (default: bf16 autocast over fp32 masters on CUDA, fp32 on the CPU)")
    ap.add_argument("--checkpointing", action="store_true", help="recompute activations in the backward pass on the CPU too")
    ap.add_argument("--no-checkpointing", action="store_true", help="keep every activation (default on CUDA: recompute)")
    ap.add_argument("--dump", action="store_true", help="also write dump.safetensors and order.txt (tests)")
    ap.add_argument("--no-merge", action="store_true", help="do not write OUT/merged")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    import transformers
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    master = torch.float64 if dtype == "fp64" else torch.float32
    autocast = dtype == "bf16"
    N = args.ctx
    beta1, beta2 = (float(x) for x in args.betas.split(","))
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    # data: exactly what 05_train reads, in its order
    stream = read_tokens(args.data)
    n_seqs = (len(stream) - 1) // N
    if n_seqs < 1:
        die("%s holds %d tokens: not one sequence of --ctx %d plus its last target" % (args.data, len(stream), N))
    order = Order(n_seqs, args.seed)

    # RoPE: linear interpolation to N, as 05_train --ctx does; a model whose config already
    # reaches N (run.sh's YaRN copy) runs the RoPE its config names, as 05_train does
    config = AutoConfig.from_pretrained(args.model)
    orig = config.max_position_embeddings
    factor = float(-(-N // orig))
    theta = config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta
    if factor > 1:
        config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_note = "%s x%g" % (rope.get("rope_type", "default"), rope.get("factor", 1.0))
    G = int(round(N * args.group_ratio))
    if abs(N * args.group_ratio - G) > 1e-9 or N % G:
        die("S2-Attn group G = N * %g is not a whole divisor of N = %d" % (args.group_ratio, N))
    S2_GROUP[0] = 0 if G >= N else G
    AttentionInterface.register("longlora_s2_sdpa", s2_attention)
    model = AutoModelForCausalLM.from_pretrained(args.model, config=config, dtype=master, attn_implementation="longlora_s2_sdpa")
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    else:
        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    model = model.to(device=device, dtype=master)
    for n, p in model.named_parameters():  # LoRA+: the embedding (and a tied head with it) and every norm
        if ("embed_tokens" in n and "embed" in args.train) or ("norm" in n and "norms" in args.train):
            p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    checkpointing = (device == "cuda" or args.checkpointing) and not args.no_checkpointing
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n], "weight_decay": args.weight_decay},
                             {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}],
                            lr=args.lr, betas=(beta1, beta2), eps=args.eps)
    if args.schedule == "constant":
        sched = transformers.get_constant_schedule_with_warmup(opt, args.warmup)
    else:
        make = {"cosine": transformers.get_cosine_schedule_with_warmup, "linear": transformers.get_linear_schedule_with_warmup}
        sched = make[args.schedule](opt, args.warmup, args.steps)
    n_trainable = sum(p.numel() for _, p in named)
    print("peer: %s, %s; N %d, G %d, RoPE %s; %d sequences; %d trainable parameters; checkpointing %s"
          % (device, dtype, N, S2_GROUP[0], rope_note, n_seqs, n_trainable, "on" if checkpointing else "off"), flush=True)

    log = open(os.path.join(args.out, "train_log.csv"), "w", newline="")
    w = csv.writer(log)
    w.writerow(["step", "loss", "lr", "grad_norm", "tokens", "step_seconds", "tokens_per_second", "mfu", "peak_memory_gib"])
    read = []
    grads1 = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_start = time.time()
    for step in range(1, args.steps + 1):
        t0 = time.time()
        k = order.next()
        read.append(k)
        x = torch.tensor(stream[k * N:k * N + N + 1].tolist(), device=device, dtype=torch.long)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x[None, :N]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits.to(master), x[1:])
        loss.backward()
        del logits
        norm = torch.sqrt(sum((p.grad.to(master) ** 2).sum() for _, p in named))
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], args.clip)
        if step == 1 and args.dump:
            grads1 = {"grad." + our_name(n): p.grad.detach().float().cpu().clone() for n, p in named}
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        loss_v, norm_v = loss.item(), norm.item()  # waits for the step
        dt = time.time() - t0
        mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        w.writerow([step, "%.9g" % loss_v, "%.9g" % lr, "%.9g" % norm_v, N, "%.6f" % dt, "%.3f" % (N / dt), "", "%.4f" % mem])
        log.flush()
        if not math.isfinite(loss_v):
            die("step %d: the loss is %s" % (step, loss_v))
        if step == 1 or step % 10 == 0 or step == args.steps:
            print("step %4d/%d | loss %.4f | lr %.3g | norm %.3f | %.0f tok/s | %.2f s | peak %.2f GiB"
                  % (step, args.steps, loss_v, lr, norm_v, N / dt, dt, mem), flush=True)
    train_seconds = time.time() - t_start
    log.close()
    run = {"engine": "PyTorch %s + transformers + peft" % torch.__version__, "schedule": args.schedule, "train": args.train, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "dtype": dtype, "checkpointing": checkpointing, "ctx": N, "group": S2_GROUP[0], "rope": rope_note,
           "steps": args.steps, "lr": args.lr, "warmup": args.warmup, "train_seconds": round(train_seconds, 2),
           "peak_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
           "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if device == "cuda" else None,
           "trainable_parameters": n_trainable, "sequences": n_seqs}
    print("peer: %d steps in %.1f s; peak GPU memory %s GiB allocated" % (args.steps, train_seconds, run["peak_memory_allocated_gib"]), flush=True)

    if args.dump:
        from safetensors.torch import save_file
        tensors = dict(grads1)
        for n, p in named:
            tensors[our_name(n)] = p.detach().float().cpu().contiguous()
        save_file(tensors, os.path.join(args.out, "dump.safetensors"))
        with open(os.path.join(args.out, "order.txt"), "w") as f:
            f.write("\n".join(str(k) for k in read) + "\n")
    if not args.no_merge:  # an HF folder for reference_eval.py: the adapter merged, the original config
        merged = model.merge_and_unload()
        path = os.path.join(args.out, "merged")
        merged.to(torch.float32).save_pretrained(path, safe_serialization=True)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            src = os.path.join(args.model, f)
            if os.path.exists(src):
                with open(src, "rb") as a, open(os.path.join(path, f), "wb") as b:
                    b.write(a.read())
        run["wall_seconds_with_merge"] = round(time.time() - t_start, 2)
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(run, f, indent=1)


if __name__ == "__main__":
    main()
