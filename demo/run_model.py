#!/usr/bin/env python3
"""The model as a demo run sees it: a linked copy of a HuggingFace folder with its own config.json.

  run_model.py SRC DST --orig N [--yarn FACTOR [--attention F]]

DST gets a symbolic link to every file of SRC but config.json, and a config.json that is
SRC's with
  - max_position_embeddings N (the CPU version takes SmolLM2's 8192 as 512: a small model of
    the same problem), and
  - with --yarn: rope_scaling {"rope_type": "yarn", "factor": FACTOR,
    "original_max_position_embeddings": N} and max_position_embeddings N x FACTOR, as
    transformers writes a YaRN model's config; --attention F adds yarn's "attention_factor"
    (default, as transformers: 0.1 ln FACTOR + 1).
05_train, 06_infer, the PyTorch peer and reference_eval.py then all read one RoPE from it.
demo/run.sh and demo/ablate.py make their copies with it. A model whose config already scales
RoPE is refused for --yarn (transformers has one rope_type per model). Standard library only;
the config is written under a temporary name and renamed.
"""
import argparse
import json
import os
import sys


def make_run_model(src, dst, orig, yarn=None, attention=None):
    """Writes the linked copy (see the module's text); returns dst. Raises ValueError on a
    model whose config already scales RoPE when yarn is asked for."""
    c = json.load(open(os.path.join(src, "config.json")))
    c["max_position_embeddings"] = orig
    if yarn and yarn > 1:
        if c.get("rope_scaling") or (c.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise ValueError("%s already scales RoPE; yarn stretches only a plain RoPE" % src)
        c["rope_scaling"] = {"rope_type": "yarn", "factor": float(yarn), "original_max_position_embeddings": orig}
        if attention:
            c["rope_scaling"]["attention_factor"] = float(attention)
        c["max_position_embeddings"] = orig * yarn
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        link = os.path.join(dst, f)
        if f != "config.json":  # replaced, so a folder reused for another model links to that one
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.abspath(os.path.join(src, f)), link)
    tmp = os.path.join(dst, "config.json.tmp")
    with open(tmp, "w") as out:
        json.dump(c, out, indent=2)
    os.replace(tmp, os.path.join(dst, "config.json"))
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--orig", type=int, required=True, help="the original context the copy's config says")
    ap.add_argument("--yarn", type=int, help="stretch RoPE by YaRN with this factor")
    ap.add_argument("--attention", type=float, help="yarn's attention_factor (default 0.1 ln FACTOR + 1)")
    a = ap.parse_args()
    if a.orig <= 0 or (a.yarn is not None and a.yarn < 1) or (a.attention is not None and not a.attention > 0):
        sys.exit("run_model.py: --orig and --yarn must be positive, --attention above 0")
    if a.attention and not a.yarn:
        sys.exit("run_model.py: --attention is yarn's; give --yarn too")
    try:
        make_run_model(a.src, a.dst, a.orig, a.yarn, a.attention)
    except (OSError, ValueError) as e:
        sys.exit("run_model.py: %s" % e)


if __name__ == "__main__":
    main()
