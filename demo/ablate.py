#!/usr/bin/env python3
"""Ablations of the demo's fine-tune: several recipes in one go, one table row each.

  demo/ablate.py [--recipes demo/ablations.txt] [--only NAME,...] [--steps 150] [--out DIR] ...

Each recipe (a line of --recipes: "NAME key=value ...", the keys listed in demo/ablations.txt)
is a shortened demo fine-tune and the demo's evaluation, on the demo's model and texts:
  engine c     05_train (the recipe's flags: schedule= as --lr-scheduler, train= as
               --no-train-embed / --no-train-norms) -> 06_infer --ppl and --passkey with the adapter
  engine peer  demo/peer_train.py (the PyTorch recipe, with the same schedules and trained
               parts) -> demo/reference_eval.py on the merged model
Both evaluate held-out Persuasion (perplexity at --ppl-lengths: stride, windows as the demo)
and LongLoRA's passkey test (c: every --passkey-interval tokens up to the context; peer: at the
perplexity lengths), --trials trials each. The passkey prompts never reach training: the data
are long texts from a package archive (the demo's Austen novels, or the paths a recipe names).

Writes into --out (default demo/results/ablations): NAME/ (the run's logs, training CSV,
evaluation tables), NAME/row.json (the row), ablations.jsonl and ablations.md (the table:
recipe, training time, last loss, perplexity at each length, passkey at 16k, 32k and over every
length). A recipe whose row.json exists is not run again (delete it to redo), so an interrupted
driver resumes; --table-only runs nothing and writes the table from the rows --out holds (rows
made by several runs, on several machines, into one table; a recipe without a row is listed as
not run). Standard library only; the peer's recipes need DEMO_PEER_PYTHON (or --python):
a Python with torch, transformers and peft.

The model and texts are run.sh's (get_model.sh, get_text.sh and the cache), or --model,
--train-text, --eval-text; --orig-ctx takes the model's context as shorter than its config
says, as run.sh's CPU version does (tests/test_demo_ablate.sh runs a tiny model that way).
"""
import argparse
import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_model import make_run_model  # noqa: E402  (demo/run_model.py: the run's linked model copy)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
KEYS = {"engine": ("c", "peer"), "rope": ("linear", "yarn"), "schedule": ("constant", "cosine", "linear"),
        "train": ("lora+embed+norms", "lora+norms", "lora+embed", "lora"), "s2": ("on", "off")}
NUMBERS = {"steps": int, "lr": float, "warmup": int, "seed": int, "rank": int, "alpha": float, "attention": float, "scale": int,
           "ctx": int}


def die(msg):
    sys.exit("ablate.py: " + msg)


def parse_recipes(path, defaults):
    """[(name, {key: value})] from a recipes file; every value checked, every clash refused."""
    recipes, seen = [], set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        die("cannot read the recipes file %s: %s" % (path, getattr(e, "strerror", None) or e))
    for no, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        name, r = words[0], dict(defaults)
        where = "%s line %d" % (path, no)
        if not all(c.isalnum() or c in "-_." for c in name) or name in seen:
            die("%s: the recipe name %r must be new and made of letters, digits, '-', '_' and '.'" % (where, name))
        seen.add(name)
        for kv in words[1:]:
            k, eq, v = kv.partition("=")
            if not eq:
                die("%s: %r is not key=value" % (where, kv))
            if k in KEYS:
                if v not in KEYS[k]:
                    die("%s: %s must be one of %s, got %r" % (where, k, "|".join(KEYS[k]), v))
            elif k in NUMBERS:
                try:
                    v = NUMBERS[k](v)
                except ValueError:
                    die("%s: %s must be a number, got %r" % (where, k, v))
                if not v > 0 and not (k in ("warmup", "seed") and v == 0):
                    die("%s: %s must be positive, got %r" % (where, k, v))
            elif k != "data":
                die("%s: unknown key %r (known: %s, data)" % (where, k, ", ".join(list(KEYS) + list(NUMBERS))))
            r[k] = v
        for k in ("attention", "scale", "ctx"):
            if k in r and (r["engine"] != "c" or r["rope"] != "yarn"):
                die("%s: %s is YaRN's (%s): it needs engine=c rope=yarn"
                    % (where, k, {"attention": "its attention factor", "scale": "its factor", "ctx": "a training length of its own"}[k]))
        if r["engine"] == "peer" and (r["rope"] != "linear" or r["s2"] != "on"):
            die("%s: the peer is evaluated by reference_eval.py (linear interpolation) and trains with S2-Attn: "
                "use engine=c for rope=yarn or s2=off" % where)
        recipes.append((name, r))
    if not recipes:
        die("%s holds no recipe" % path)
    return recipes


def make_out(path):
    """The output folder, made where missing; one sentence and exit 1 where it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        die("the output folder %s is a file" % path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        die("cannot make the output folder %s: %s" % (path, e.strerror or e))


def read_row(path):
    """A finished recipe's row.json; one sentence and exit 1 where it is not one."""
    try:
        with open(path) as f:
            row = json.load(f)
    except (OSError, ValueError) as e:
        die("%s cannot be read as a row (%s): delete it to run the recipe again" % (path, e))
    if not isinstance(row, dict) or "name" not in row:
        die("%s is not a row of this driver: delete it to run the recipe again" % path)
    return row


def run(cmd, log, timeout=None):
    """Runs cmd with its output into log; the exit status."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(shlex.quote(os.path.relpath(c, ROOT) if c.startswith(ROOT + os.sep) else c) for c in cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write("timed out after %s s\n" % timeout)
            return 124


def token_file(text, model, work):
    """01_tokenize's token file of a text (cached next to the run, redone when the text changes)."""
    key = hashlib.sha256(os.path.realpath(text).encode()).hexdigest()[:12]  # two texts of one name stay apart
    out = os.path.join(work, "tokens", "%s.%s.tok" % (os.path.basename(text), key))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if not os.path.exists(out) or os.path.getmtime(out) < max(os.path.getmtime(text), os.path.getmtime(os.path.join(model, "tokenizer.json"))):
        r = subprocess.run([os.path.join(ROOT, "01_tokenize"), "--tokenizer", model, "--encode-file", text, "--out", out + ".tmp"],
                           capture_output=True, text=True)
        if r.returncode:
            die("01_tokenize failed on %s: %s" % (text, r.stderr.strip().splitlines()[-1:]))
        os.replace(out + ".tmp", out)
    return out


def join_tokens(paths, out):
    """One token file holding paths' tokens in order (as 05_train joins several --data token files)."""
    ids, width = bytearray(), 2
    parts = []
    for p in paths:
        b = open(p, "rb").read()
        w, n = int.from_bytes(b[8:12], "little"), int.from_bytes(b[12:20], "little")
        parts.append((w, n, b[20:]))
        width = max(width, w)
    total = 0
    for w, n, body in parts:
        if w == width:
            ids += body
        else:  # widen uint16 ids to uint32
            ids += b"".join(int.from_bytes(body[2 * i:2 * i + 2], "little").to_bytes(4, "little") for i in range(n))
        total += n
    with open(out, "wb") as f:
        f.write(b"LLTK" + (1).to_bytes(4, "little") + width.to_bytes(4, "little") + total.to_bytes(8, "little") + bytes(ids))
    return out


def read_c_ppl(path):
    """06_infer --ppl's table: {length: perplexity}."""
    out = {}
    for line in open(path):
        f = line.split()
        if f and f[0].isdigit():
            out[int(f[0])] = float(f[3])
    return out


def read_c_passkey(path):
    """06_infer --passkey --csv: {length: (correct, trials)}."""
    out = {}
    for r in csv.DictReader(open(path)):
        c, t = out.get(int(r["target_tokens"]), (0, 0))
        out[int(r["target_tokens"])] = (c + int(r["correct"]), t + 1)
    return out


def last_loss(train_csv, k=10):
    rows = list(csv.DictReader(open(train_csv)))
    return sum(float(r["loss"]) for r in rows[-k:]) / min(k, len(rows)) if rows else None


def run_recipe(name, r, a, model, factor, data_tok, eval_tok, out):
    """Trains and evaluates one recipe in out/; returns its row."""
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "run.log")
    t0 = time.time()
    device = a.device
    if r["engine"] == "c":
        adapter = os.path.join(out, "adapter")
        rope = ["--rope-scaling", r["rope"]]
        train_ctx = r.get("ctx", a.ctx)  # the evaluation stays at --ctx
        if "attention" in r or "scale" in r or "ctx" in r:  # YaRN with its factor, attention factor or length set: a model copy whose config says so
            orig = json.load(open(os.path.join(model, "config.json")))["max_position_embeddings"]
            model = make_run_model(model, os.path.join(a.work, "model-" + name), orig,
                                   r.get("scale", -(-max(train_ctx, a.ctx) // orig)), r.get("attention"))
            rope = []
        cmd = [os.path.join(ROOT, "05_train"), "--model", model, "--data"] + data_tok + [
            "--ctx", str(train_ctx), "--max-steps", str(r["steps"]), "--lr", str(r["lr"]), "--warmup", str(r["warmup"]),
            "--seed", str(r["seed"]), "--lora-rank", str(r["rank"]), "--lora-alpha", str(r["alpha"])] + rope + [
            "--device", device, "--log-every", "10", "--overwrite", "--out", adapter]
        if r["s2"] == "off":
            cmd.append("--no-s2")
        if r["schedule"] != "constant":
            cmd += ["--lr-scheduler", r["schedule"]]
        cmd += [flag for part, flag in (("embed", "--no-train-embed"), ("norms", "--no-train-norms")) if part not in r["train"].split("+")]
        if run(cmd, log):
            return {"name": name, "error": "05_train failed (%s)" % log}
        train_s = time.time() - t0
        loss = last_loss(os.path.join(adapter, "train_log.csv"))
        base = [os.path.join(ROOT, "06_infer"), "--model", model, "--adapter", adapter, "--ctx", str(a.ctx), "--device", device]
        ppl_txt, pk_csv = os.path.join(out, "ppl.txt"), os.path.join(out, "passkey.csv")
        with open(ppl_txt, "w") as f:
            rc = subprocess.run(base + ["--ppl", eval_tok, "--seq-len", a.ppl_lengths, "--stride", str(a.stride),
                                        "--max-windows", str(a.windows)], stdout=f, stderr=open(log, "a"), cwd=ROOT).returncode
        if rc or run(base + ["--passkey", "--max-tokens", str(a.passkey_max or a.ctx // a.passkey_interval * a.passkey_interval), "--interval", str(a.passkey_interval),
                             "--trials", str(a.trials), "--csv", pk_csv], log):
            return {"name": name, "error": "06_infer failed (%s)" % log}
        ppl, passkey = read_c_ppl(ppl_txt), read_c_passkey(pk_csv)
    else:
        peer = os.path.join(out, "peer")
        py = a.python or os.environ.get("DEMO_PEER_PYTHON") or "python3"
        joined = join_tokens(data_tok, os.path.join(out, "data.tok"))
        cmd = [py, os.path.join(ROOT, "demo", "peer_train.py"), "--model", model, "--data", joined, "--ctx", str(a.ctx),
               "--steps", str(r["steps"]), "--lr", str(r["lr"]), "--warmup", str(r["warmup"]), "--seed", str(r["seed"]),
               "--lora-rank", str(r["rank"]), "--lora-alpha", str(r["alpha"]), "--schedule", r["schedule"], "--train", r["train"],
               "--device", "cuda" if device == "gpu" else "cpu", "--out", peer] + shlex.split(a.peer_flags)
        if run(cmd, log):
            return {"name": name, "error": "peer_train.py failed (%s)" % log}
        train_s = time.time() - t0
        loss = last_loss(os.path.join(peer, "train_log.csv"))
        res = os.path.join(out, "peer_eval.json")
        if run([py, os.path.join(ROOT, "demo", "reference_eval.py"), "--model", os.path.join(peer, "merged"), "--text", a.eval_text,
                "--lengths", a.ppl_lengths, "--rope", "pi-x%d" % factor, "--stride", str(a.stride), "--max-windows", str(a.windows),
                "--trials", str(a.trials), "--out", res], log):
            return {"name": name, "error": "reference_eval.py failed (%s)" % log}
        rows = json.load(open(res))["results"]
        ppl = {x["length"]: x["perplexity"] for x in rows if x.get("perplexity") is not None}
        passkey = {x["length"]: (round(x["passkey_accuracy"] * x["trials"]), x["trials"]) for x in rows if x.get("trials")}
    return {"name": name, "recipe": {k: v for k, v in r.items()}, "train_seconds": round(train_s, 1),
            "seconds": round(time.time() - t0, 1), "last_loss": loss, "perplexity": {str(k): v for k, v in sorted(ppl.items())},
            "passkey": {str(k): list(v) for k, v in sorted(passkey.items())}}


def write_table(rows, defaults, lengths, path):
    def changed(r):
        rec = r.get("recipe", {})
        diff = ["%s=%s" % (k, v) for k, v in rec.items() if k != "engine" and defaults.get(k) != v]
        return "%s: %s" % (rec.get("engine", "?"), ", ".join(diff) or "the demo's recipe")

    def pk(r, n):
        c = r.get("passkey", {}).get(str(n))
        return "%d/%d" % tuple(c) if c else "-"

    head = ["recipe", "what differs", "train s", "loss (last 10)"] + ["ppl %d" % n for n in lengths] + \
           ["passkey 16000", "passkey 32000", "passkey, all lengths", "passkey by length"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append("| %s | %s |" % (r["name"], r["error"]) + " |" * (len(head) - 2))
            continue
        allc = sum(c for c, _ in r["passkey"].values()), sum(t for _, t in r["passkey"].values())
        cells = [r["name"], changed(r), "%.0f" % r["train_seconds"], "%.4f" % r["last_loss"] if r["last_loss"] else "-"]
        cells += ["%.2f" % r["perplexity"][str(n)] if str(n) in r["perplexity"] else "-" for n in lengths]
        by_length = " ".join(str(r["passkey"][k][0]) for k in sorted(r["passkey"], key=int))  # keys found at each length, shortest first
        cells += [pk(r, 16000), pk(r, 32000), "%d/%d" % allc, by_length]
        lines.append("| " + " | ".join(cells) + " |")
    with open(path + ".tmp", "w") as f:
        done = [r for r in rows if "error" not in r]
        note = ("\n\nPasskey by length: keys found out of %d at %s tokens." % (done[0]["passkey"][min(done[0]["passkey"], key=int)][1],
                ", ".join(sorted(done[0]["passkey"], key=int)))) if done and done[0]["passkey"] else ""
        f.write("\n".join(lines) + note + "\n\nDefaults: " + ", ".join("%s=%s" % kv for kv in defaults.items()) + "\n")
    os.replace(path + ".tmp", path)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=os.path.join(ROOT, "demo", "ablations.txt"))
    ap.add_argument("--only", help="comma-separated recipe names to run (default: all)")
    ap.add_argument("--model", help="HF folder (default: demo/get_model.sh's SmolLM2)")
    ap.add_argument("--train-text", help="the texts data=austen means (default: get_text.sh's austen-train.txt)")
    ap.add_argument("--eval-text", help="held-out text (default: get_text.sh's austen-eval.txt)")
    ap.add_argument("--orig-ctx", type=int, help="take the model's context as this (a linked copy of its folder, as run.sh's CPU version)")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=150, help="default steps of a recipe (the demo runs 300)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--ppl-lengths", default="2000,4000,8000,16000,32000")
    ap.add_argument("--stride", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--passkey-interval", type=int, default=4000)
    ap.add_argument("--passkey-max", type=int, help="default: the last multiple of the interval within --ctx (32000, as the demo)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--python", help="the peer's Python (default: $DEMO_PEER_PYTHON, else python3)")
    ap.add_argument("--peer-flags", default="--no-checkpointing", help="more flags for peer_train.py")
    ap.add_argument("--out", default=os.path.join(ROOT, "demo", "results", "ablations"))
    ap.add_argument("--table-only", action="store_true", help="run nothing: the table of the rows --out holds")
    a = ap.parse_args()

    defaults = {"engine": "c", "rope": "linear", "steps": a.steps, "lr": a.lr, "warmup": a.warmup, "seed": 42, "rank": 8,
                "alpha": 16.0, "schedule": "constant", "train": "lora+embed+norms", "s2": "on", "data": "austen"}
    recipes = parse_recipes(a.recipes, defaults)
    if a.only:
        want = a.only.split(",")
        unknown = [w for w in want if w not in {n for n, _ in recipes}]
        if unknown:
            die("--only names recipes %s has not: %s" % (a.recipes, ", ".join(unknown)))
        recipes = [(n, r) for n, r in recipes if n in want]
    if a.table_only:
        make_out(a.out)
        lengths = [int(x) for x in a.ppl_lengths.split(",")]
        rows = []
        for name, _ in recipes:
            row_path = os.path.join(a.out, name, "row.json")
            rows.append(read_row(row_path) if os.path.exists(row_path) else {"name": name, "error": "not run"})
        lines = write_table(rows, defaults, lengths, os.path.join(a.out, "ablations.md"))
        with open(os.path.join(a.out, "ablations.jsonl"), "w") as f:
            for row in rows:
                if "error" not in row:
                    f.write(json.dumps(row) + "\n")
        print("\n".join(lines))
        return 0
    for prog in ("01_tokenize", "05_train", "06_infer"):
        if not os.access(os.path.join(ROOT, prog), os.X_OK):
            die("./%s is not built (make %s)" % (prog, prog))
    cache = os.environ.get("LONGLORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "longlora-c")
    model = a.model
    if not model:
        r = subprocess.run(["bash", "demo/get_model.sh"], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            die("demo/get_model.sh failed: " + r.stderr.strip())
        model = r.stdout.strip().splitlines()[-1]
    if not a.train_text or not a.eval_text:
        r = subprocess.run(["bash", "demo/get_text.sh"], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            die("demo/get_text.sh failed: " + r.stderr.strip())
        text_dir = os.path.dirname(r.stdout.strip().splitlines()[-1])
        a.train_text = a.train_text or os.path.join(text_dir, "austen-train.txt")
        a.eval_text = a.eval_text or os.path.join(text_dir, "austen-eval.txt")
    def texts_of(r):  # a recipe's training texts; never the held-out one
        return [a.train_text if d == "austen" else d for d in r["data"].split(",")]
    for name, r in recipes:
        for t in texts_of(r):
            if not os.path.isfile(t):
                die("recipe %s: data %s is not a file" % (name, t))
            if os.path.realpath(t) == os.path.realpath(a.eval_text):
                die("recipe %s: trains on the held-out text %s" % (name, t))
    make_out(a.out)
    work = a.work = os.path.join(cache, "ablations")  # token files and model copies
    os.makedirs(work, exist_ok=True)
    config = json.load(open(os.path.join(model, "config.json")))
    orig = a.orig_ctx or config["max_position_embeddings"]
    if orig != config["max_position_embeddings"]:  # run.sh's CPU version: the same weights, a shorter context
        model = make_run_model(model, os.path.join(work, "model-ctx%d" % orig), orig)
    factor = -(-a.ctx // orig)
    eval_tok = token_file(a.eval_text, model, work)
    lengths = [int(x) for x in a.ppl_lengths.split(",")]
    print("ablate.py: %d recipes; %s, context %d -> %d (x%d), %s; results in %s"
          % (len(recipes), os.path.basename(os.path.normpath(model)), orig, a.ctx, factor, a.device, a.out), flush=True)

    rows = []
    for name, r in recipes:
        out = os.path.join(a.out, name)
        row_path = os.path.join(out, "row.json")
        if os.path.exists(row_path):
            row = read_row(row_path)
            print("%-14s done before (%s)" % (name, row_path), flush=True)
        else:
            data_tok = [token_file(t, model, work) for t in texts_of(r)]
            print("%-14s running: %s" % (name, " ".join("%s=%s" % kv for kv in r.items() if defaults.get(kv[0]) != kv[1]) or "defaults"), flush=True)
            row = run_recipe(name, r, a, model, factor, data_tok, eval_tok, out)
            if "error" in row:
                print("%-14s FAILED: %s" % (name, row["error"]), flush=True)
            else:
                with open(row_path + ".tmp", "w") as f:
                    json.dump(row, f, indent=1)
                os.replace(row_path + ".tmp", row_path)
        rows.append(row)
        lines = write_table(rows, defaults, lengths, os.path.join(a.out, "ablations.md"))
        print("   " + lines[-1], flush=True)
    with open(os.path.join(a.out, "ablations.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    failed = [r["name"] for r in rows if "error" in r]
    print("ablate.py: %d recipes, %d failed%s; table %s" % (len(rows), len(failed), (": " + ", ".join(failed)) if failed else "",
                                                          os.path.join(a.out, "ablations.md")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
