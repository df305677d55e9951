"""demo/peer_train.py runs 05_train's recipe: the same losses, gradients, data order and weights.

A tiny random LLaMA written here with transformers (tied head; 9 query heads over 3 KV heads,
so the S2 head split is the odd H // 2 = 4 of SmolLM2's 9; norms not all 1; trained context
32), a peft adapter with B random (every gradient flows from the first step), a token file of
5 sequences of N = 128 tokens (RoPE x4, G = 32, S = 16) plus one. Both trainers start from that
adapter and run the demo's recipe (AdamW 0.9, 0.95, eps 1e-8, no weight decay, no clipping,
warmup then constant) for 7 steps at lr 1e-2, warmup 2, seed 7, so the data order wraps into a
second epoch; then an ablation's recipe the same way (the cosine schedule, the embedding frozen:
05_train --lr-scheduler cosine --no-train-embed, the peer's --schedule cosine --train lora+norms):
  05_train --device cpu (fp32), with a checkpoint after every step
  peer_train.py --device cpu --dtype fp64 (the reference)
and must agree:
  order       the sequence read at each step: checkpoint data.order vs the peer's   exactly
  loss        each step's                                    |ours - peer| <= 5e-6
  grad norm   each step's (before clipping)                  |ours - peer| <= 5e-6 |peer|
  lr          each step's                                    |ours - peer| <= 1e-9
  gradients   step 1's, of every trainable tensor (ours from checkpoint-1's AdamW first
              moment: m = (1 - beta1) g)                    max |ours - peer| <= 2e-5 max |peer|
  weights     every trainable tensor after the last step     max |ours - peer| <= 1e-5
Our fp32 against the peer's float64 sets the tolerances (measured worst: loss 2e-7, grad norm
3e-7, gradients 1e-6, weights 3e-7; the S2 head split off by one head moves step 1's loss by 9e-3).
First, with the standard library alone (so CI checks it): peer_train.Order against the order
05_train's checkpoints record over three epochs of a tiny random model. Then, skipped (77)
without torch, transformers, peft or safetensors: the peer's S2-Attn against common.h's rule as
an explicit mask (odd H and G, G = 1; <= 1e-12 in float64) and the run above.
"""
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
V, D, F, L, H, HK, MAX_POS = 256, 72, 96, 2, 9, 3, 32
N, SEQS, STEPS, LR, WARMUP, SEED = 128, 5, 7, 1e-2, 2, 7
TOL_LOSS, TOL_NORM, TOL_GRAD, TOL_WEIGHT = 5e-6, 5e-6, 2e-5, 1e-5


def safetensors_ints(path, name):
    """One integer tensor of a safetensors file, read with the standard library."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        t = head[name]
        a, b = t["data_offsets"]
        f.seek(8 + n + a)
        raw = f.read(b - a)
    code = {"I64": "q", "U64": "Q", "I32": "i", "U32": "I"}[t["dtype"]]
    return list(struct.unpack("<%d%s" % (len(raw) // struct.calcsize(code), code), raw))


def check_order(train, work):
    """Without torch: peer_train.Order reads the sequences 05_train reads (a tiny random model,
    5 sequences, 12 steps: three epochs, two reshuffles). Returns a list of failures."""
    sys.path.insert(0, os.path.join(ROOT, "demo"))
    import peer_train
    n_seqs, steps, n, seed = 5, 12, 64, 9
    data = os.path.join(work, "order.tok")
    ids = [(7 * i) % V for i in range(n_seqs * n + 1)]
    with open(data, "wb") as f:
        f.write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + struct.pack("<%dH" % len(ids), *ids))
    out = os.path.join(work, "order")
    r = subprocess.run([train, "--device", "cpu", "--init", "random", "--shape", "tiny", "--data", data, "--ctx", str(n),
                        "--max-steps", str(steps), "--save-every", "1", "--seed", str(seed), "--quiet", "--out", out],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return ["05_train --init random exited %d: %s" % (r.returncode, (r.stdout + r.stderr).strip()[-300:])]
    ours = [safetensors_ints(os.path.join(out, "checkpoint-%d" % s, "train_state.safetensors"), "data.order")[(s - 1) % n_seqs]
            for s in range(1, steps + 1)]
    order = peer_train.Order(n_seqs, seed)
    peer = [order.next() for _ in range(steps)]
    print("order over %d steps (%d epochs): 05_train %s, peer %s" % (steps, -(-steps // n_seqs), ours, peer))
    return [] if ours == peer else ["peer_train.Order differs from 05_train's order"]


def main():
    train = os.path.join(ROOT, "05_train")
    if not os.access(train, os.X_OK):
        print("skip: ./05_train is not built")
        return 77
    work = tempfile.mkdtemp(prefix="test_demo_peer_")
    try:
        bad = check_order(train, work)
        for m in bad:
            print("FAIL: " + m)
        if bad:
            return 1
        return check_training(train, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_s2(torch):
    """peer_train.s2_attention (SDPA over groups) against common.h's s2_first_key as an explicit
    mask, float64, odd H and G, G = 1, H = Hk. Returns a list of failures."""
    sys.path.insert(0, os.path.join(ROOT, "demo"))
    import peer_train

    class Training:
        training = True

    bad = []
    for H, HK, n, g in ((9, 3, 24, 6), (9, 3, 28, 7), (4, 2, 16, 1), (5, 5, 20, 5)):
        q = torch.randn(2, H, n, 8, dtype=torch.float64)
        k, v = torch.randn(2, HK, n, 8, dtype=torch.float64), torch.randn(2, HK, n, 8, dtype=torch.float64)
        peer_train.S2_GROUP[0] = g
        out, _ = peer_train.s2_attention(Training(), q, k, v, None, 0.35)

        def first_key(i, h):
            if h < H // 2:
                return (i // g) * g
            s = g // 2
            return 0 if i < s else s + ((i - s) // g) * g
        mask = torch.tensor([[[first_key(i, h) <= j <= i for j in range(n)] for i in range(n)] for h in range(H)])
        kk, vv = k.repeat_interleave(H // HK, 1), v.repeat_interleave(H // HK, 1)
        ref = ((q @ kk.transpose(2, 3)) * 0.35).masked_fill(~mask, float("-inf")).softmax(-1) @ vv
        err = (out - ref.transpose(1, 2)).abs().max().item()
        print("S2-Attn H %d Hk %d N %d G %d: max |SDPA groups - explicit mask| %.1e" % (H, HK, n, g, err))
        if err > 1e-12:
            bad.append("S2-Attn at H %d, N %d, G %d differs from the mask by %.3g" % (H, n, g, err))
    peer_train.S2_GROUP[0] = 0
    return bad


def check_training(train, work):
    try:
        import torch
        import peft  # noqa: F401
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        print("skip: the data order agrees; the training run needs torch, transformers, peft and safetensors (%s)" % e)
        return 77
    seed = int(os.environ.get("TEST_SEED", "11"))
    torch.manual_seed(seed)
    bad = check_s2(torch)
    model_dir, adapter_dir = os.path.join(work, "model"), os.path.join(work, "adapter_init")
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=HK, head_dim=D // H, max_position_embeddings=MAX_POS, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    base.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      bias="none", task_type="CAUSAL_LM")
    init = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)
    with torch.no_grad():
        for n, p in init.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    init.save_pretrained(adapter_dir)
    ids = torch.randint(0, V, (SEQS * N + 1,)).tolist()
    data = os.path.join(work, "data.tok")
    with open(data, "wb") as f:
        f.write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + struct.pack("<%dH" % len(ids), *ids))

    recipe = ["--ctx", str(N), "--lr", str(LR), "--warmup", str(WARMUP), "--seed", str(SEED)]
    # the demo's recipe (LoRA+, constant), then an ablation's (cosine, the embedding frozen)
    variants = (("LoRA+, constant", [], [], True),
                ("LoRA + norms, cosine", ["--lr-scheduler", "cosine", "--no-train-embed"], ["--schedule", "cosine", "--train", "lora+norms"], False))
    for k, (label, ours_flags, peer_flags, embed) in enumerate(variants):
        print("-- %s" % label)
        bad += compare_runs(train, load_file, model_dir, adapter_dir, data, os.path.join(work, "v%d" % k), recipe + ours_flags,
                            recipe + peer_flags, embed)
    for m in bad:
        print("FAIL: " + m)
    if bad:
        return 1
    print("peer_train.py = 05_train over %d steps (order, losses, grad norms, lr, step-1 gradients, final weights), "
          "LoRA+ with the constant schedule and LoRA + norms with the cosine one" % STEPS)
    return 0


def compare_runs(train, load_file, model_dir, adapter_dir, data, work, ours_recipe, peer_recipe, embed):
    """05_train and the peer from the same adapter with their flags for one recipe; a list of failures."""
    bad = []
    os.makedirs(work)
    ours, peer = os.path.join(work, "ours"), os.path.join(work, "peer")
    cmd = [train, "--device", "cpu", "--model", model_dir, "--adapter", adapter_dir, "--data", data, "--max-steps", str(STEPS),
           "--save-every", "1", "--quiet", "--out", ours] + ours_recipe
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr)
        return ["05_train exited %d" % r.returncode]
    cmd = [sys.executable, os.path.join(ROOT, "demo", "peer_train.py"), "--device", "cpu", "--dtype", "fp64", "--model", model_dir,
           "--adapter", adapter_dir, "--data", data, "--steps", str(STEPS), "--dump", "--no-merge", "--out", peer] + peer_recipe
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr)
        return ["peer_train.py exited %d" % r.returncode]

    a = list(csv.DictReader(open(os.path.join(ours, "train_log.csv"))))
    b = list(csv.DictReader(open(os.path.join(peer, "train_log.csv"))))
    if len(a) != STEPS or len(b) != STEPS:
        bad.append("logs hold %d and %d steps, not %d" % (len(a), len(b), STEPS))
    print("step  loss (05_train / peer)        grad norm (05_train / peer)   lr")
    worst_loss = worst_norm = 0.0
    for x, y in zip(a, b):
        dl = abs(float(x["loss"]) - float(y["loss"]))
        dn = abs(float(x["grad_norm"]) - float(y["grad_norm"])) / float(y["grad_norm"])
        worst_loss, worst_norm = max(worst_loss, dl), max(worst_norm, dn)
        print("%4s  %.9f %.9f  %.9f %.9f  %s / %s" % (x["step"], float(x["loss"]), float(y["loss"]), float(x["grad_norm"]),
                                                      float(y["grad_norm"]), x["lr"], y["lr"]))
        if dl > TOL_LOSS:
            bad.append("step %s: loss %s vs %s" % (x["step"], x["loss"], y["loss"]))
        if dn > TOL_NORM:
            bad.append("step %s: grad norm %s vs %s" % (x["step"], x["grad_norm"], y["grad_norm"]))
        if abs(float(x["lr"]) - float(y["lr"])) > 1e-9:
            bad.append("step %s: lr %s vs %s" % (x["step"], x["lr"], y["lr"]))

    # the order: each epoch's shuffle is in its checkpoints' data.order; step s read order[(s-1) % SEQS]
    peer_order = [int(v) for v in open(os.path.join(peer, "order.txt")).read().split()]
    our_order = []
    for s in range(1, STEPS + 1):
        st = load_file(os.path.join(ours, "checkpoint-%d" % s, "train_state.safetensors"))
        our_order.append(int(st["data.order"].view(-1)[(s - 1) % SEQS]))
    print("order: 05_train %s, peer %s" % (our_order, peer_order))
    if our_order != peer_order:
        bad.append("the data order differs")

    dump = load_file(os.path.join(peer, "dump.safetensors"))
    first = load_file(os.path.join(ours, "checkpoint-1", "train_state.safetensors"))
    last = load_file(os.path.join(ours, "checkpoint-%d" % STEPS, "train_state.safetensors"))
    names = sorted(k for k in dump if not k.startswith("grad."))
    worst_grad = worst_weight = 0.0
    for name in names:
        if name + ".exp_avg" not in first or name not in last:
            bad.append("05_train's checkpoint has no %s" % name)
            continue
        g_peer = dump["grad." + name].double()
        g_ours = first[name + ".exp_avg"].double().view_as(g_peer) / (1 - 0.9)
        scale = g_peer.abs().max().item()
        dg = (g_ours - g_peer).abs().max().item() / scale
        dw = (last[name].double().view_as(dump[name]) - dump[name].double()).abs().max().item()
        worst_grad, worst_weight = max(worst_grad, dg), max(worst_weight, dw)
        if dg > TOL_GRAD:
            bad.append("%s: step 1's gradient differs by %.3g of its largest entry" % (name, dg))
        if dw > TOL_WEIGHT:
            bad.append("%s: after %d steps the weights differ by %.3g" % (name, STEPS, dw))
    print("%d trainable tensors; worst: loss %.2e, grad norm %.2e (relative), step-1 gradient %.2e (of its max), weights %.2e"
          % (len(names), worst_loss, worst_norm, worst_grad, worst_weight))
    if len(names) != L * 4 * 2 + embed + 2 * L + 1:
        bad.append("the peer trains %d tensors, not LoRA A and B of q,k,v,o,%s and %d norms" % (len(names), " the embedding" if embed else "",
                                                                                             2 * L + 1))
    if ("model.embed_tokens.weight" in last) != embed:
        bad.append("05_train's checkpoint %s the embedding" % ("lacks" if embed else "holds"))
    return bad


if __name__ == "__main__":
    sys.exit(main())
