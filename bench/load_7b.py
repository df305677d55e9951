"""Writes a LLaMA-2-7B-shaped HF folder with random bf16 weights, as a user's checkpoint
looks: config.json, three safetensors shards split at layer boundaries and
model.safetensors.index.json (bench/load_device.sh then loads it with 05_train and 06_infer).
    python3 bench/load_7b.py DIR [TOKENIZER_DIR]
Weights are drawn on the GPU when there is one (N(0, 0.02^2); norms 1)."""
import json, os, shutil, sys, time
import torch
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
D, F, L, H, V = 4096, 11008, 32, 32, 32000
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D, "intermediate_size": F,
       "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": H, "vocab_size": V,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
       "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
dev = "cuda" if torch.cuda.is_available() else "cpu"
gen = torch.Generator(device=dev).manual_seed(0)

def rand(*shape):
    return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

def layer(l):
    p = f"model.layers.{l}."
    return {p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(D, D), p + "self_attn.k_proj.weight": rand(D, D),
            p + "self_attn.v_proj.weight": rand(D, D), p + "self_attn.o_proj.weight": rand(D, D),
            p + "mlp.gate_proj.weight": rand(F, D), p + "mlp.up_proj.weight": rand(F, D), p + "mlp.down_proj.weight": rand(D, F)}

t0 = time.time()
bounds = [(0, 11), (11, 22), (22, 32)]
weight_map, total = {}, 0
for s, (lo, hi) in enumerate(bounds):
    name = f"model-{s + 1:05d}-of-{len(bounds):05d}.safetensors"
    t = {}
    if s == 0: t["model.embed_tokens.weight"] = rand(V, D)
    for l in range(lo, hi): t.update(layer(l))
    if s == len(bounds) - 1:
        t["model.norm.weight"] = torch.ones(D, dtype=torch.bfloat16)
        t["lm_head.weight"] = rand(V, D)
    save_file(t, os.path.join(out, name), metadata={"format": "pt"})
    for k, v in t.items():
        weight_map[k] = name
        total += v.numel() * 2
json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
if len(sys.argv) > 2:
    for f in os.listdir(sys.argv[2]): shutil.copy(os.path.join(sys.argv[2], f), out)
print(f"wrote {out}: {total / 1e9:.2f} GB of bf16 weights in {len(bounds)} shards in {time.time() - t0:.1f} s")
