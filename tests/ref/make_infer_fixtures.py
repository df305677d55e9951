"""Fixtures for 06_infer.c from transformers + peft (run by hand, outputs committed).

    make 06_infer && python tests/ref/make_infer_fixtures.py

Writes tests/fixtures/infer/:
  base/config.json, model.safetensors   a tiny random LLaMA (fp32; GQA 4 heads over 2, untied,
                                        max_position_embeddings 32)
  adapter/                              a peft LoRA adapter (r 4, alpha 8, random A and B) on all
                                        seven projections
  ref.bin                               tokens [301]; for the context 64 (RoPE linear factor
                                        ceil(64/32) = 2, set as LongLoRA's eval.py sets it) and
                                        seq_len 24 and 64 with stride 16: every window's loss and
                                        the perplexity by eval.py's protocol, computed by
                                        transformers + peft in float64; and, for the folder that
                                        ./06_infer --export writes from base + adapter at ctx 64
                                        (--shard-size 20000: several shards and an index), the
                                        logits transformers computes after loading it (float64,
                                        tokens[:40]) and an FNV-1a 64 hash of each file it loaded.

eval.py's protocol, as its code does it: starts = range(0, len - seq_len, stride) without its
last element; window x = tokens[i : i + seq_len]; loss = model(input_ids=x, labels=x).loss (the
mean over the seq_len - 1 shifted targets); PPL = exp(mean of the window losses).

Fixture file format: tests/ref/fixture_io.py (magic "INFX").
"""
import json, math, os, shutil, subprocess, tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

import fixture_io  # tests/ref/fixture_io.py, beside this script

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "infer")
CTX, SEQ_LENS, STRIDE, N_TOKENS, N_LOGITS, SHARD = 64, [24, 64], 16, 301, 40, 20000


def write_fixture(path, tensors):
    fixture_io.write_fixture(path, b"INFX", tensors, keep_f64=True)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def with_linear_rope(cfg, factor):
    """eval.py: config.rope_scaling = {"type": "linear", "factor": s}, in transformers 5's spelling too."""
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    else:
        cfg.rope_scaling = {"type": "linear", "factor": float(factor)}
    return cfg


def main():
    torch.manual_seed(0)
    base_dir, adapter_dir = os.path.join(OUT, "base"), os.path.join(OUT, "adapter")
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=32, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # norms away from 1 so they matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(base_dir, safe_serialization=True)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lcfg)
    peft_model.save_pretrained(adapter_dir)
    os.remove(os.path.join(adapter_dir, "README.md"))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = "tests/fixtures/infer/base"  # no machine paths in committed files
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(acfg, f, indent=2)

    # the reference: base (with linear RoPE at CTX) + adapter, float64
    factor = math.ceil(CTX / cfg.max_position_embeddings)
    ref_cfg = with_linear_rope(LlamaConfig.from_pretrained(base_dir), factor)
    ref = AutoModelForCausalLM.from_pretrained(base_dir, config=ref_cfg, dtype=torch.float64)
    ref = PeftModel.from_pretrained(ref, adapter_dir).double().eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, cfg.vocab_size, size=N_TOKENS).astype(np.int64)
    out = [("tokens", tokens.astype(np.int32))]
    with torch.no_grad():
        x = torch.tensor(tokens[None, :CTX])
        assert not torch.allclose(ref.get_base_model()(x).logits, plain(x).logits), "RoPE interpolation had no effect"
        for L in SEQ_LENS:
            starts = list(range(0, N_TOKENS - L, STRIDE))
            starts.pop()
            losses = []
            for i in starts:
                x = torch.tensor(tokens[None, i:i + L])
                losses.append(ref(input_ids=x, labels=x).loss.item())
            losses = np.array(losses, dtype=np.float64)
            out.append((f"window_loss_{L}", losses))
            out.append((f"ppl_{L}", np.array([math.exp(losses.mean())], dtype=np.float64)))
            print(f"seq_len {L}: {len(losses)} windows, ppl {math.exp(losses.mean()):.6f}")

        # the folder our exporter writes, loaded by transformers
        tmp = tempfile.mkdtemp()
        export_dir = os.path.join(tmp, "merged")
        subprocess.run([os.path.join(ROOT, "06_infer"), "--model", base_dir, "--adapter", adapter_dir, "--ctx", str(CTX),
                        "--export", export_dir, "--shard-size", str(SHARD)], check=True)
        files = sorted(os.listdir(export_dir))
        assert "model.safetensors.index.json" in files, files
        exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float64).eval()
        assert exported.config.max_position_embeddings * factor == CTX  # the base's, stretched by rope_scaling
        x = torch.tensor(tokens[None, :N_LOGITS])
        logits = exported(x).logits[0].numpy()
        merged_ref = ref(x).logits[0].numpy()
        print("export: transformers' logits vs the unmerged fp64 reference: max diff %.3g (bf16 weights)"
              % np.abs(logits - merged_ref).max())
        out.append(("export_logits", logits.astype(np.float64)))
        for name in files:
            with open(os.path.join(export_dir, name), "rb") as f:
                h = fnv1a64(f.read())
            out.append((f"hash:{name}", np.array([h & 0xFFFFFFFF, h >> 32], dtype=np.uint32).view(np.int32)))
        shutil.rmtree(tmp)
    write_fixture(os.path.join(OUT, "ref.bin"), out)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
