"""Fixtures for 03_lora.c, from transformers + peft (run by hand, outputs committed).

    python tests/ref/make_lora_fixtures.py            # base models, peft adapters, references
    python tests/ref/make_lora_fixtures.py --ours     # also: peft's logits for the adapters our C code saved
                                                      # (needs build/tests/test_lora, built first)
    python tests/ref/make_lora_fixtures.py --check-merged   # ./03_lora --merge-out loads in transformers
                                                      # and gives peft's logits (needs ./03_lora; checks only)
    python tests/ref/make_lora_fixtures.py --adamw    # adamw.bin only (the AdamW steps and the schedules)

Writes tests/fixtures/lora/:
  <cfg>/config.json, model.safetensors   a tiny random LLaMA (fp32) used as the base model
  <cfg>/adapter_peft/                    a LoRA+ adapter saved by peft (random A, B, embed, norms)
  <cfg>/ref.bin                          tokens, targets; logits, loss and the gradient of every
                                         trainable tensor for that adapter, S2-Attn off and on
  <cfg>/adapter_ours/, ours_ref.bin      (--ours) the adapter test_lora writes, and peft's logits for it
  adamw.bin                              torch.optim.AdamW steps and transformers' schedules with warmup
                                         (constant; cosine and linear, past their end too)

S2-Attn reference: an attention function that builds the explicit per-head boolean mask from
docs/DESIGN.md's rule (segment ids per head, causal inside a segment), independent of the C code.
Everything runs in float64; tensors are stored as float32 / int32.

Fixture file format: tests/ref/fixture_io.py (magic "LRFX").
"""
import json, os, shutil, subprocess, sys

import numpy as np
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

import fixture_io  # tests/ref/fixture_io.py, beside this script

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")

# name: model shape, LoRA setup, test sequence (N is never a multiple of 8; G = N/4)
CONFIGS = {
    "gqa_untied": dict(V=67, D=32, L=2, H=4, Hk=2, F=44, tied=False, max_pos=16, target_ctx=32,
                       r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"], B=2, N=20, seed=1),
    "mha3_tied": dict(V=53, D=24, L=2, H=3, Hk=1, F=36, tied=True, max_pos=64, target_ctx=64,
                      r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      B=2, N=12, seed=2),
}
MODULES_TO_SAVE = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]


def write_fixture(path, tensors):
    fixture_io.write_fixture(path, b"LRFX", tensors, keep_f64=False)


# ---- S2-Attn reference: explicit mask ----------------------------------------------------
S2_GROUP = {"G": 0}


def s2_allowed(N, H, G):
    """[H, N, N] boolean: may query i of head h attend to key j (docs/DESIGN.md, written out)."""
    i = torch.arange(N)
    allowed = torch.zeros(H, N, N, dtype=torch.bool)
    S = G // 2
    for h in range(H):
        if h < H // 2:
            seg = i // G                                   # [0,G), [G,2G), ...
        else:
            seg = torch.where(i < S, torch.zeros_like(i), 1 + (i - S) // G)  # [0,S), [S,S+G), ..., no wrap
        allowed[h] = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    return allowed


def s2_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query [B, H, N, d], key/value [B, Hk, N, d] (RoPE already applied with global positions)
    Bq, H, N, d = query.shape
    rep = H // key.shape[1]
    key = key.repeat_interleave(rep, dim=1)    # a KV head serves its query heads
    value = value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    mask = s2_allowed(N, H, S2_GROUP["G"]) if S2_GROUP["G"] else torch.ones(N, N, dtype=torch.bool).tril()[None].expand(H, N, N)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, N, H, d]
    return out, probs


AttentionInterface.register("s2_reference", s2_attention)


def hf_config(c):
    return LlamaConfig(vocab_size=c["V"], hidden_size=c["D"], intermediate_size=c["F"], num_hidden_layers=c["L"],
                       num_attention_heads=c["H"], num_key_value_heads=c["Hk"], max_position_embeddings=c["max_pos"],
                       tie_word_embeddings=c["tied"], rms_norm_eps=1e-5, rope_theta=10000.0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None)


def load_base(d, c):
    """The base model in float64, RoPE linearly interpolated to target_ctx (s = ceil(target/orig))."""
    s = -(-c["target_ctx"] // c["max_pos"])
    cfg = LlamaConfig.from_pretrained(d)
    if s > 1:
        cfg.rope_parameters = {"rope_type": "linear", "factor": float(s), "rope_theta": 10000.0}
    return LlamaForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float64, attn_implementation="eager")


def peft_name(n):
    """peft parameter name -> our tensor name (what the adapter file calls it, minus the prefix)."""
    n = n.replace("base_model.model.", "", 1).replace(".default", "").replace(".modules_to_save", "")
    return n


def run_reference(pm, c, tokens, targets, G):
    S2_GROUP["G"] = G
    for mod in pm.modules():
        if hasattr(mod, "config") and hasattr(mod.config, "_attn_implementation"):
            mod.config._attn_implementation = "s2_reference" if G else "eager"
    pm.zero_grad(set_to_none=True)
    logits = pm(input_ids=torch.tensor(tokens, dtype=torch.long)).logits  # [B, N, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, c["V"]), torch.tensor(targets, dtype=torch.long).reshape(-1))
    loss.backward()
    grads = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            name = peft_name(n)
            if name == "lm_head.weight":  # the tied head's trainable copy: its grad belongs to embed_tokens
                name = "model.embed_tokens.weight"
            g = p.grad.detach().numpy().copy()
            grads[name] = grads[name] + g if name in grads else g
    return logits.detach().numpy(), loss.item(), grads


def randomize_adapter(pm, gen):
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
            elif "embed_tokens" in n or "lm_head" in n:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.05)
            else:  # norms
                p.copy_(1.0 + torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
        if getattr(pm.peft_config["default"], "ensure_weight_tying", False):  # keep the tied copies equal
            base = pm.base_model.model
            base.lm_head.modules_to_save["default"].weight.copy_(base.model.embed_tokens.modules_to_save["default"].weight)


def make_config(name, c):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(c["seed"])
    base = LlamaForCausalLM(hf_config(c)).float()
    with torch.no_grad():  # non-trivial norms in the base too
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
    base.save_pretrained(d, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(d, extra)):
            os.remove(os.path.join(d, extra))

    # An adapter saved by peft, with every trainable tensor random.
    gen = torch.Generator().manual_seed(100 + c["seed"])
    lc = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, target_modules=c["targets"],
                    modules_to_save=MODULES_TO_SAVE, task_type="CAUSAL_LM", ensure_weight_tying=c["tied"])
    pm = get_peft_model(load_base(d, c), lc)
    randomize_adapter(pm, gen)
    ad = os.path.join(d, "adapter_peft")
    if os.path.exists(ad):
        shutil.rmtree(ad)
    pm.to(torch.float32).save_pretrained(ad)
    os.remove(os.path.join(ad, "README.md"))  # peft's model card: not needed
    with open(os.path.join(ad, "adapter_config.json")) as f:  # no machine paths in committed files
        ac = json.load(f)
    ac["base_model_name_or_path"] = os.path.relpath(d, ROOT)
    ac["target_modules"] = sorted(ac["target_modules"])  # peft writes a set: keep the file stable
    with open(os.path.join(ad, "adapter_config.json"), "w") as f:
        json.dump(ac, f, indent=2, sort_keys=True)
        f.write("\n")

    # Reference: peft loads it back (the path a user takes) and runs forward + backward.
    pm = PeftModel.from_pretrained(load_base(d, c), ad, is_trainable=True).to(torch.float64)
    rng = np.random.default_rng(c["seed"])
    tokens = rng.integers(0, c["V"], size=(c["B"], c["N"]))
    targets = rng.integers(0, c["V"], size=(c["B"], c["N"]))
    out = [("tokens", tokens), ("targets", targets)]
    for tag, G in (("full", 0), ("s2", c["N"] // 4)):
        logits, loss, grads = run_reference(pm, c, tokens.tolist(), targets.tolist(), G)
        out += [(f"{tag}.logits", logits), (f"{tag}.loss", np.array([loss]))]
        out += [(f"{tag}.grad.{k}", v) for k, v in sorted(grads.items())]
        print(f"{name} {tag}: G={G} loss {loss:.6f}, {len(grads)} gradients")
    write_fixture(os.path.join(d, "ref.bin"), out)


def make_ours(name, c):
    """Our C code writes an adapter; peft loads it with PeftModel.from_pretrained; record peft's logits."""
    d = os.path.join(OUT, name)
    ad = os.path.join(d, "adapter_ours")
    exe = os.path.join(ROOT, "build", "tests", "test_lora")
    subprocess.run([exe, "--write-ours-adapter", name, ad], check=True)
    pm = PeftModel.from_pretrained(load_base(d, c), ad).to(torch.float64)
    pm.eval()
    rng = np.random.default_rng(1000 + c["seed"])
    tokens = rng.integers(0, c["V"], size=(c["B"], c["N"]))
    S2_GROUP["G"] = 0
    with torch.no_grad():
        logits = pm(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    write_fixture(os.path.join(d, "ours_ref.bin"), [("tokens", tokens), ("logits", logits)])
    print(f"{name}: peft loaded our adapter, logits recorded")


def schedule_lrs(make, steps):
    """The learning rate of each of `steps` optimizer steps under a transformers schedule (lr 2e-5)."""
    q = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([q], lr=2e-5)
    sched = make(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs, dtype=np.float64)


def make_adamw():
    """torch.optim.AdamW: three steps on a random tensor, and transformers' schedules with warmup."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    g = torch.Generator().manual_seed(7)
    n = 1003
    p0 = torch.randn(n, generator=g, dtype=torch.float32)
    grads = [torch.randn(n, generator=g, dtype=torch.float32) * s for s in (1.0, 0.01, 3.0)]
    out = [("p0", p0.numpy())] + [(f"grad{i}", gr.numpy()) for i, gr in enumerate(grads)]
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for i, gr in enumerate(grads):
        p.grad = gr.clone()
        opt.step()
        out.append((f"p{i + 1}", p.detach().numpy().copy()))
    out.append(("warmup20_lr2e-5", schedule_lrs(lambda o: get_constant_schedule_with_warmup(o, num_warmup_steps=20), 30)))
    # cosine (half a cycle) and linear decay over 100 steps, 20 past the end (linear stays at 0, cosine rises again)
    out.append(("cosine_warmup20_total100_lr2e-5", schedule_lrs(lambda o: get_cosine_schedule_with_warmup(o, 20, 100), 120)))
    out.append(("linear_warmup20_total100_lr2e-5", schedule_lrs(lambda o: get_linear_schedule_with_warmup(o, 20, 100), 120)))
    write_fixture(os.path.join(OUT, "adamw.bin"), out)
    print("adamw: 3 steps; schedules: 30 constant, 120 cosine and 120 linear values")


def check_merged(name, c):
    """./03_lora --load-adapter (peft's) --merge-out: transformers loads the folder, logits equal peft's."""
    import tempfile
    d = os.path.join(OUT, name)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "merged")
        subprocess.run([os.path.join(ROOT, "03_lora"), "--model", d, "--ctx", str(c["target_ctx"]),
                        "--load-adapter", os.path.join(d, "adapter_peft"), "--merge-out", out], check=True)
        merged = LlamaForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation="eager").eval()
        pm = PeftModel.from_pretrained(load_base(d, c), os.path.join(d, "adapter_peft")).to(torch.float64).eval()
        tokens = torch.tensor(np.random.default_rng(5).integers(0, c["V"], size=(2, c["N"])))
        S2_GROUP["G"] = 0
        with torch.no_grad():
            a, b = merged(input_ids=tokens).logits, pm(input_ids=tokens).logits
        err = ((a - b).abs().max() / b.abs().max()).item()
        print(f"{name}: merged folder in transformers vs peft: {err:.2e} relative max-norm")
        assert err < 1e-5, err


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    os.makedirs(OUT, exist_ok=True)
    if "--check-merged" in sys.argv:
        for name, c in CONFIGS.items():
            check_merged(name, c)
    elif "--ours" in sys.argv:
        for name, c in CONFIGS.items():
            make_ours(name, c)
    elif "--adamw" in sys.argv:
        make_adamw()
    else:
        make_adamw()
        for name, c in CONFIGS.items():
            make_config(name, c)
