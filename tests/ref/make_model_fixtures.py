"""Makes the fixtures tests/test_model.c checks 02_model.c against, with HF transformers.

Run where torch + transformers are installed (not needed in CI: the output is committed):
    python tests/ref/make_model_fixtures.py [out_dir]    (default tests/fixtures/model)

For each tiny random LLaMA-family config it writes a HF model folder (config.json +
model.safetensors, fp32) and ref.bin holding the inputs and HF's outputs:
    llama2_like   MHA, untied head, head_dim 64, N = 13, B = 2
                  (+ logits_ctx: the same weights with RoPE stretched by --ctx, linear factor 3)
    smollm2_like  GQA 3:1, tied head, head_dim 64, rope_theta 1e5, N = 37, B = 2
    rope_linear4  GQA 2:1, rope_scaling linear factor 4, 2 layers, N = 75 > max_position 32
                  (+ rope_linear4_bf16/: the same model as bf16 shards with an index, and
                  logits_bf16: HF's fp32 logits for those bf16-rounded weights)

ref.bin: tests/ref/fixture_io.py's format (magic "LLMF"), read by tests/fixture.h.
Records: meta i32 [B, N, ctx] (ctx: the --ctx giving logits_ctx, else 0), tokens i32 [B, N],
targets i32 [B, N] (targets[b, i] = labels[b, i + 1], -100 = ignored, last column -100),
logits f32 [B, N, V], loss f32 [1], and grad.<HF parameter name> f32 for every parameter
(HF's loss: the mean over targets that are not -100).
llama2_like also gets lm_tokens.lltk (its B rows one after another, a token file) and
lm_loss.txt ("<HF loss with labels = tokens> <N>"): the CLI's loss over that file in
windows of N tokens must match it.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fixture_io  # tests/ref/fixture_io.py, beside this script


def randomize(model, gen):
    """Weights large enough that attention is far from uniform and every path matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:  # logits of a tied head stay O(1) too
                p.copy_(2.0 * torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))


def run(model, tokens, labels):
    model.zero_grad()
    out = model(input_ids=tokens, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().numpy().astype(np.float32) for n, p in model.named_parameters()}
    return out.logits.detach().numpy().astype(np.float32), float(out.loss.detach()), grads


def write_tokens(path, ids):
    """The stages' token file (common.h): "LLTK", version 1, width 2, count, uint16 ids."""
    with open(path, "wb") as f:
        f.write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + np.asarray(ids, dtype="<u2").tobytes())


def start(out_root, name, cfg, model_cls, B, N, seed, randomize=randomize, ctx=0):
    """What every fixture begins with: a tiny model of model_cls for cfg with weights from
    `randomize`, B x N random tokens and labels (a fifth of them -100) from one generator,
    HF's logits, loss and gradients, the folder as HF saves it (without generation_config.json)
    and ref.bin's records so far (meta [B, N, ctx] .. grad.<name>).
    Returns (folder, model, tokens, loss, records)."""
    gen = torch.Generator().manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).float().eval()
    randomize(model, gen)
    V = cfg.vocab_size
    tokens = torch.randint(0, V, (B, N), generator=gen)
    labels = torch.randint(0, V, (B, N), generator=gen)
    labels[torch.rand((B, N), generator=gen) < 0.2] = -100
    logits, loss, grads = run(model, tokens, labels)

    folder = os.path.join(out_root, name)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    if os.path.exists(os.path.join(folder, "generation_config.json")):
        os.remove(os.path.join(folder, "generation_config.json"))

    targets = np.full((B, N), -100, dtype=np.int32)
    targets[:, :-1] = labels[:, 1:].numpy()
    records = [("meta", np.array([B, N, ctx], dtype=np.int32)),
               ("tokens", tokens.numpy().astype(np.int32)),
               ("targets", targets),
               ("logits", logits),
               ("loss", np.array([loss], dtype=np.float32))]
    records += [("grad." + n, g) for n, g in grads.items()]
    return folder, model, tokens, loss, records


def finish(folder, records):
    """ref.bin written; the folder's size in bytes"""
    fixture_io.write_fixture(os.path.join(folder, "ref.bin"), b"LLMF", records, keep_f64=False)
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(folder) for f in fs)


def make(out_root, name, cfg_kwargs, B, N, seed, ctx=0, bf16_copy=False, lm_check=False):
    cfg = LlamaConfig(**cfg_kwargs)
    folder, model, tokens, loss, records = start(out_root, name, cfg, LlamaForCausalLM, B, N, seed, ctx=ctx)

    if ctx:  # the same weights with RoPE stretched the way --ctx stretches it
        factor = float(int(np.ceil(ctx / cfg.max_position_embeddings)))
        cfg2 = LlamaConfig(**cfg_kwargs, rope_scaling={"rope_type": "linear", "factor": factor})
        cfg2._attn_implementation = "eager"
        m2 = LlamaForCausalLM(cfg2).float().eval()
        m2.load_state_dict(model.state_dict())
        with torch.no_grad():
            records.append(("logits_ctx", m2(input_ids=tokens).logits.numpy().astype(np.float32)))

    if bf16_copy:
        folder16 = folder + "_bf16"
        shutil.rmtree(folder16, ignore_errors=True)
        m16 = LlamaForCausalLM(cfg).eval()
        m16.load_state_dict(model.state_dict())
        m16 = m16.to(torch.bfloat16)
        m16.save_pretrained(folder16, safe_serialization=True, max_shard_size="100KB")
        if os.path.exists(os.path.join(folder16, "generation_config.json")):
            os.remove(os.path.join(folder16, "generation_config.json"))
        assert os.path.exists(os.path.join(folder16, "model.safetensors.index.json")), "expected shards"
        # HF itself reading those shards into fp32 (RoPE tables recomputed in fp32)
        m32 = LlamaForCausalLM.from_pretrained(folder16, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            records.append(("logits_bf16", m32(input_ids=tokens).logits.numpy().astype(np.float32)))

    if lm_check:  # for the CLI: the language-model loss over the rows, one window per row
        with torch.no_grad():
            lm_loss = float(model(input_ids=tokens, labels=tokens).loss)
        write_tokens(os.path.join(folder, "lm_tokens.lltk"), tokens.flatten().tolist())
        with open(os.path.join(folder, "lm_loss.txt"), "w") as f:
            f.write(f"{lm_loss:.7f} {N}\n")

    size = finish(folder, records)
    print(f"{name}: B={B} N={N} loss={loss:.6f} params={sum(p.numel() for p in model.parameters())} bytes={size}")


# Sizes are chosen off the matmul tiles (4 rows, 4 weight rows, blocks of 32/64): F = 88, 70,
# 90 and V = 61, 67 exercise every remainder path; T = 26, 74, 75 rows.
def main():
    out_root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "model")
    os.makedirs(out_root, exist_ok=True)
    torch.manual_seed(0)
    make(out_root, "llama2_like",
         dict(hidden_size=128, intermediate_size=88, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=64, vocab_size=64, max_position_embeddings=16,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2),
         B=2, N=13, seed=1, ctx=40, lm_check=True)
    make(out_root, "smollm2_like",
         dict(hidden_size=192, intermediate_size=70, num_hidden_layers=1, num_attention_heads=3,
              num_key_value_heads=1, head_dim=64, vocab_size=61, max_position_embeddings=2048,
              rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2),
         B=2, N=37, seed=2)
    make(out_root, "rope_linear4",
         dict(hidden_size=64, intermediate_size=90, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, vocab_size=67, max_position_embeddings=32,
              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
              rope_scaling={"rope_type": "linear", "factor": 4.0},
              bos_token_id=1, eos_token_id=2),
         B=1, N=75, seed=3, bf16_copy=True)


if __name__ == "__main__":
    main()
