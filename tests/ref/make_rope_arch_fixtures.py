"""Fixtures for the RoPE types and architectures beyond plain LLaMA, made by transformers.

Run where torch + transformers are installed (not needed in CI: the output is committed):
    python tests/ref/make_rope_arch_fixtures.py [out_dir]    (default tests/fixtures/model)

Each tiny random model is written as a HF folder (config.json + model.safetensors, fp32) with
ref.bin in make_model_fixtures.py's format (meta, tokens, targets, logits, loss and grad.<name>
of every parameter), so tests/test_model.c checks them exactly as it checks the LLaMA ones:
    rope_dynamic   LLaMA, rope_type dynamic factor 3 over max_position_embeddings 16, N = 41 > 16
                   (transformers' NTK base for seq_len 41)
    rope_yarn      LLaMA, rope_type yarn factor 4 over 64 (original_max_position_embeddings
                   left to default to it, beta 32/1, attention factor 0.1 ln 4 + 1), N = 70
    rope_llama3    LLaMA, rope_type llama3 factor 8, low 1, high 4, original 32, max 128:
                   head dims in all three bands (kept, blended, divided), N = 50
    mistral_like   Mistral, sliding_window null, GQA 4:2, untied, rope_theta 1e6
    qwen2_tied     Qwen2 (q, k, v biases), GQA 3:1, tied head, default RoPE
    qwen2_yarn     Qwen2, untied, yarn with every parameter spelled out (factor 2, original
                   32, beta_fast 8, beta_slow 2, truncate false, attention_factor 1.25)
Sizes are odd on purpose (F, V, N off the matmul tiles).
"""
import os
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_model_fixtures import finish, start  # noqa: E402


def randomize(model, gen):
    """As make_model_fixtures.randomize, with biases ~ 0.5 N(0, 1) (not norm-like)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(2.0 * torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))


def make(out_root, name, cfg_cls, model_cls, cfg_kwargs, B, N, seed):
    cfg = cfg_cls(**cfg_kwargs)
    folder, _, _, loss, records = start(out_root, name, cfg, model_cls, B, N, seed, randomize=randomize)
    size = finish(folder, records)
    print(f"{name}: B={B} N={N} loss={loss:.6f} rope={cfg.rope_parameters} bytes={size}")


SMALL = dict(hidden_size=64, intermediate_size=46, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, vocab_size=53, rms_norm_eps=1e-6, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)


def main():
    out_root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "model")
    os.makedirs(out_root, exist_ok=True)
    torch.manual_seed(0)
    make(out_root, "rope_dynamic", LlamaConfig, LlamaForCausalLM,
         dict(SMALL, max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}),
         B=2, N=41, seed=11)
    make(out_root, "rope_yarn", LlamaConfig, LlamaForCausalLM,
         dict(SMALL, max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
         B=1, N=70, seed=12)
    make(out_root, "rope_llama3", LlamaConfig, LlamaForCausalLM,
         dict(SMALL, max_position_embeddings=128,
              rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32, "rope_theta": 10000.0}),
         B=2, N=50, seed=13)
    make(out_root, "mistral_like", MistralConfig, MistralForCausalLM,
         dict(SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
              sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
         B=2, N=23, seed=14)
    make(out_root, "qwen2_tied", Qwen2Config, Qwen2ForCausalLM,
         dict(SMALL, hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
              max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
         B=2, N=29, seed=15)
    make(out_root, "qwen2_yarn", Qwen2Config, Qwen2ForCausalLM,
         dict(SMALL, max_position_embeddings=32,
              rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 8.0,
                               "beta_slow": 2.0, "truncate": False, "attention_factor": 1.25, "rope_theta": 10000.0}),
         B=1, N=45, seed=16)


if __name__ == "__main__":
    main()
