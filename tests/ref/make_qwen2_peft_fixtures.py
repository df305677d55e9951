"""Fixtures for a Qwen2-shaped model fine-tuned by our 05_train with yarn, checked by peft and
transformers (run by hand from the repository root after `make`, outputs committed):

    python tests/ref/make_qwen2_peft_fixtures.py

Writes tests/fixtures/qwen2_peft/:
  base/        a tiny random Qwen2 (fp32; q, k, v biases; GQA 2:1; untied head;
               max_position_embeddings 32; plain RoPE, theta 1e6)
  data.tok     a token file of random ids
  adapter/     what ./05_train --ctx 64 --rope-scaling yarn --max-steps 3 --device cpu wrote
               (LoRA on q,k,v,o plus embed_tokens and the norms as modules_to_save), with its
               config.json: the base's with rope_scaling yarn factor 2
  ref.bin      in make_infer_fixtures.py's format:
                 tokens [64]
                 peft_logits [64, V] f64: transformers' model built from the adapter's config.json
                   (AutoConfig) and the base's weights, with peft's PeftModel.from_pretrained of
                   our adapter folder, in float64
                 export_logits [64, V] f64: transformers loading the folder ./06_infer --export
                   writes from base + adapter (bf16 shards, --shard-size 20000), in float64
                 hash:<file> u32[2]: FNV-1a 64 of every file of that folder and of the adapter's
                   files, so the C test can tell our writers still write what these libraries read
The script also asserts what transformers reads back: the adapter's and the export's config
give rope_type yarn, factor 2, max_position_embeddings 32, and peft's logits differ from the
base's (the adapter and the RoPE both matter).
"""
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_infer_fixtures import fnv1a64, write_fixture  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
REL = os.path.join("tests", "fixtures", "qwen2_peft")
OUT = os.path.join(ROOT, REL)
CTX, V, SHARD = 64, 89, 20000


def write_tokens(path, ids):
    with open(path, "wb") as f:
        f.write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + np.asarray(ids, dtype="<u2").tobytes())


def hashes(folder, prefix=""):
    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h = fnv1a64(f.read())
        out.append((f"hash:{prefix}{name}", np.array([h & 0xFFFFFFFF, h >> 32], dtype=np.uint32).view(np.int32)))
    return out


def main():
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    base_rel, adapter_rel = os.path.join(REL, "base"), os.path.join(REL, "adapter")
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=32, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      bos_token_id=1, eos_token_id=2)
    base = Qwen2ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    base.save_pretrained(os.path.join(ROOT, base_rel), safe_serialization=True)
    gc = os.path.join(ROOT, base_rel, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)
    rng = np.random.default_rng(7)
    write_tokens(os.path.join(OUT, "data.tok"), rng.integers(3, V, size=4 * CTX + 1).tolist())

    # our training run: yarn to 64 over the base's 32
    tmp = tempfile.mkdtemp()
    run_dir = os.path.join(tmp, "run")
    subprocess.run([os.path.join(ROOT, "05_train"), "--model", base_rel, "--data", os.path.join(REL, "data.tok"), "--ctx", str(CTX),
                    "--rope-scaling", "yarn", "--max-steps", "3", "--lr", "1e-2", "--warmup", "0", "--lora-rank", "4",
                    "--device", "cpu", "--out", run_dir, "--quiet", "--seed", "5"], check=True, cwd=ROOT)
    adapter_dir = os.path.join(ROOT, adapter_rel)
    os.makedirs(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json"):
        shutil.copy(os.path.join(run_dir, name), os.path.join(adapter_dir, name))

    # transformers + peft: the model the adapter's config.json describes, with our adapter
    acfg = AutoConfig.from_pretrained(adapter_dir)
    assert acfg.rope_parameters["rope_type"] == "yarn" and acfg.rope_parameters["factor"] == 2.0, acfg.rope_parameters
    assert acfg.max_position_embeddings == 32
    acfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, base_rel), config=acfg, dtype=torch.float64)
    model = PeftModel.from_pretrained(model, adapter_dir).double().eval()
    plain = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, base_rel), dtype=torch.float64, attn_implementation="eager").eval()
    tokens = rng.integers(0, V, size=CTX).astype(np.int64)
    x = torch.tensor(tokens[None])
    out = [("tokens", tokens.astype(np.int32))]
    with torch.no_grad():
        peft_logits = model(x).logits[0].numpy()
        assert np.abs(peft_logits - plain(x).logits[0].numpy()).max() > 1e-2, "the adapter and RoPE had no effect"
        out.append(("peft_logits", peft_logits.astype(np.float64)))

        # our export, loaded by transformers
        export_dir = os.path.join(tmp, "merged")
        subprocess.run([os.path.join(ROOT, "06_infer"), "--model", base_rel, "--adapter", adapter_rel, "--export", export_dir,
                        "--shard-size", str(SHARD)], check=True, cwd=ROOT)
        exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float64, attn_implementation="eager").eval()
        rp = exported.config.rope_parameters
        assert rp["rope_type"] == "yarn" and rp["factor"] == 2.0 and exported.config.max_position_embeddings == 32, rp
        export_logits = exported(x).logits[0].numpy()
        print("peft vs base: %.3g; export (bf16 weights) vs peft (fp32): max diff %.3g"
              % (np.abs(peft_logits - plain(x).logits[0].numpy()).max(), np.abs(export_logits - peft_logits).max()))
        out.append(("export_logits", export_logits.astype(np.float64)))
        out += hashes(export_dir)
        out += hashes(adapter_dir, "adapter/")
    shutil.rmtree(tmp)
    write_fixture(os.path.join(OUT, "ref.bin"), out)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
