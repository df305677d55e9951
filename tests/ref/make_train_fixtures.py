"""Fixtures for 05_train.c: the LongLoRA recipe run by transformers + peft + torch.optim.AdamW
(run by hand, outputs committed):

    python tests/ref/make_train_fixtures.py

Writes tests/fixtures/train/:
  model/config.json, model.safetensors   a tiny random LLaMA (bf16 on disk, tied head, GQA,
                                         norms not all 1), trained context 48
  adapter_init/                          a peft LoRA adapter on q,k,v,o (r 8, alpha 16), B random
                                         so every gradient flows from the first step
  data.tok                               2 * 92 + 1 tokens (bytes of an English text): two
                                         sequences of N = 92
  ref.bin                                what the reference training run did (format below)

The reference run is the recipe of LongLoRA's fine-tune.py under the HF Trainer, written out:
RoPE linearly interpolated to N = 92 (factor ceil(92 / 48) = 2); S2-Attn with G = N / 4 = 23
through an attention function that builds docs/DESIGN.md's per-head mask explicitly (no wrap-around);
LoRA on q,k,v,o plus trainable embed_tokens and every RMSNorm weight; AdamW (betas 0.9, 0.95,
eps 1e-8, weight decay 0.1 on everything but the norms, as the Trainer groups them), lr 5e-3
with get_constant_schedule_with_warmup(3); micro-batches of 1 sequence, 2 accumulated per step
(loss / 2 each), clip_grad_norm_(1.0). Every step uses both sequences, so the order the C code
shuffles them into does not matter. Everything runs in float64.

ref.bin (little-endian): "TRFX", u32 version = 1, u32 steps, f64 loss[steps] (mean of the two
micro-batch losses), f64 grad_norm[steps] (before clipping), f64 lr[steps], u32 count, then per
trainable tensor after the last step: u32 name length, name (ours: model.layers.0.self_attn.
q_proj.lora_A.weight, model.embed_tokens.weight, ...), u64 numel, f32 data[numel].
"""
import json, os, struct

import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, get_constant_schedule_with_warmup
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "train")
V, D, F, L, H, HK, MAX_POS = 256, 48, 100, 2, 4, 2, 48
N, STEPS, LR, WARMUP, WD, CLIP, ACCUM = 92, 8, 5e-3, 3, 0.1, 1.0, 2
G = N // 4
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families.")


def may_attend(n, heads, g):
    """[heads, n, n] booleans from docs/DESIGN.md: heads h < H/2 causal inside [kG, (k+1)G); the others
    shifted by S = G // 2: causal inside [0, S), [S, S+G), ..., the last segment ending at n."""
    pos = torch.arange(n)
    out = torch.empty(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        if h < heads // 2:
            segment = pos // g
        else:
            s = g // 2
            segment = torch.where(pos < s, 0, 1 + torch.div(pos - s, g, rounding_mode="floor"))
        out[h] = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
    return out


def s2_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query [B, H, N, d]; key, value [B, Hk, N, d], RoPE applied with global positions
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~may_attend(query.shape[2], query.shape[1], G)[None], float("-inf"))
    probs = scores.softmax(dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("longlora_s2_reference", s2_attention)


def our_name(peft_param_name):
    return peft_param_name.replace("base_model.model.", "", 1).replace(".default", "")


def main():
    torch.manual_seed(5)
    os.makedirs(OUT, exist_ok=True)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=HK, max_position_embeddings=MAX_POS, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      rope_theta=10000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    base.to(torch.bfloat16).save_pretrained(os.path.join(OUT, "model"), safe_serialization=True)

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      bias="none", task_type="CAUSAL_LM")
    init = get_peft_model(LlamaForCausalLM.from_pretrained(os.path.join(OUT, "model"), dtype=torch.float32), lora)
    with torch.no_grad():
        for n, p in init.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    init.save_pretrained(os.path.join(OUT, "adapter_init"))
    # peft records the absolute path of the base model; keep the fixture free of machine paths
    cfg_path = os.path.join(OUT, "adapter_init", "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "tests/fixtures/train/model"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for extra in ("adapter_init/README.md", "model/generation_config.json"):  # not needed
        if os.path.exists(os.path.join(OUT, extra)):
            os.remove(os.path.join(OUT, extra))

    ids = list(TEXT.encode("utf-8"))[: 2 * N + 1]
    assert len(ids) == 2 * N + 1
    with open(os.path.join(OUT, "data.tok"), "wb") as f:
        f.write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + struct.pack("<%dH" % len(ids), *ids))

    # the reference run, float64
    rcfg = LlamaConfig.from_pretrained(os.path.join(OUT, "model"))
    rcfg.rope_parameters = {"rope_type": "linear", "factor": float(-(-N // MAX_POS)), "rope_theta": 10000.0}
    model = LlamaForCausalLM.from_pretrained(os.path.join(OUT, "model"), config=rcfg, dtype=torch.float64,
                                             attn_implementation="longlora_s2_reference")
    model = PeftModel.from_pretrained(model, os.path.join(OUT, "adapter_init"), is_trainable=True).to(torch.float64)
    for n, p in model.named_parameters():
        if "embed_tokens" in n or "norm" in n:
            p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n], "weight_decay": WD},
                             {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    sched = get_constant_schedule_with_warmup(opt, WARMUP)
    stream = torch.tensor(ids)
    losses, norms, lrs = [], [], []
    for step in range(STEPS):
        opt.zero_grad()
        micro = []
        for k in range(ACCUM):
            x, y = stream[k * N:k * N + N][None], stream[k * N + 1:k * N + N + 1]
            loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits[0], y)
            (loss / ACCUM).backward()
            micro.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for _, p in named], CLIP)))
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        losses.append(sum(micro) / ACCUM)
        print("step %d loss %.6f grad_norm %.6f lr %.2e" % (step + 1, losses[-1], norms[-1], lrs[-1]))

    with open(os.path.join(OUT, "ref.bin"), "wb") as f:
        f.write(b"TRFX" + struct.pack("<II", 1, STEPS))
        for arr in (losses, norms, lrs):
            f.write(struct.pack("<%dd" % STEPS, *arr))
        f.write(struct.pack("<I", len(named)))
        for n, p in named:
            name = our_name(n).encode()
            data = p.detach().to(torch.float32).contiguous().view(-1)
            f.write(struct.pack("<I", len(name)) + name + struct.pack("<Q", data.numel()))
            f.write(struct.pack("<%df" % data.numel(), *data.tolist()))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
