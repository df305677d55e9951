#!/usr/bin/env bash
# demo/ablate.py, the ablation driver, on a tiny model on the CPU, offline: the tiny LLaMA of
# tests/test_demo_cpu.sh (a random GGUF converted by demo/convert_gguf.py), generated texts,
# context 128 taken as the original and 512 the target (x4), 3 steps per recipe; recipes: the
# demo's, YaRN, YaRN with attention factor 1, YaRN x8 (a factor past the context's x4), full attention in training, a data list of two texts,
# 05_train with a cosine schedule training plain LoRA, and (where a Python has
# torch, transformers and peft: $PEER_PYTHON, $PYTHON, python3) the PyTorch peer with a cosine
# schedule. Checked: every recipe has a row with finite perplexities at 128/256/512 and a
# passkey count in [0, trials]; a second run resumes (runs nothing); --table-only runs nothing
# and writes the same rows plus "not run" for a recipe without one; the logs name the programs
# relative to the repository, not by this machine's path; the cosine plain-LoRA recipe runs
# 05_train with --lr-scheduler cosine --no-train-embed --no-train-norms, logs a decaying lr and
# saves an adapter without modules_to_save (where the peer ran, its cosine lr is 05_train's at
# every step); bad recipe files end with
# one sentence and a non-zero exit (unknown key, bad value, an unknown trained part, YaRN for
# the peer, YaRN's attention factor or factor without YaRN or not positive, a name twice, training on the
# held-out text). A recipe with YaRN's attention factor trains and evaluates a model copy
# whose config says so, and its adapter carries it; so does a recipe with YaRN's factor.
cd "$(dirname "$0")/.." || exit 1
. tests/demo_tiny.sh
PY=${PYTHON:-python3}
if ! "$PY" -c 'import gguf, numpy' 2>/dev/null; then
  echo "skip: $PY has no gguf/numpy (make test installs tests/requirements.txt into .venv)"
  exit 77
fi
demo_test_start 01_tokenize 05_train 06_infer

make_tiny_demo "$TMP" "$SEED" train.txt:6000 more.txt:3000 eval.txt:3000 || { echo "FAIL: could not make the tiny model and text"; exit 1; }

find_peer_python
cat > "$TMP/recipes.txt" <<RECIPES
# the test's recipes
demo        engine=c
yarn        engine=c rope=yarn
yarn-af1    engine=c rope=yarn attention=1.0
yarn-x8     engine=c rope=yarn attention=1.0 scale=8
yarn-long   engine=c rope=yarn attention=1.0 ctx=640
full-attn   engine=c s2=off lr=1e-3
two-texts   engine=c data=austen,$TMP/more.txt
cosine-lora engine=c schedule=cosine train=lora
RECIPES
[ -n "$PEER_PY" ] && echo "peer-cosine engine=peer schedule=cosine" >> "$TMP/recipes.txt"
n_recipes=$(grep -c engine= "$TMP/recipes.txt")
ablate() {
  LONGLORA_CACHE=$TMP/cache "$PY" demo/ablate.py --model "$TMP/model" --train-text "$TMP/train.txt" --eval-text "$TMP/eval.txt" \
    --orig-ctx 128 --ctx 512 --steps 3 --lr 3e-3 --warmup 1 --ppl-lengths 128,256,512 --stride 256 --windows 2 \
    --passkey-interval 256 --trials 2 --device cpu --python "${PEER_PY:-python3}" --peer-flags "" --out "$TMP/out" "$@"
}
ablate --recipes "$TMP/recipes.txt" > "$TMP/run.log" 2>&1
rc=$?
[ $rc -eq 0 ] && ok || { bad "ablate.py exited $rc"; tail -n 20 "$TMP/run.log"; for f in "$TMP"/out/*/run.log; do tail -n 5 "$f"; done; }
"$PY" - "$TMP/out" "$n_recipes" <<'PYEOF' && ok || bad "the rows are not as they should be"
import json, math, sys
out, n = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(out + "/ablations.jsonl")]
assert len(rows) == n, "%d rows for %d recipes" % (len(rows), n)
for r in rows:
    assert "error" not in r, r
    for L in ("128", "256", "512"):
        p = r["perplexity"][L]
        assert math.isfinite(p) and 1 < p < 3000, (r["name"], L, p)
    for L, (c, t) in r["passkey"].items():
        assert 0 <= c <= t == 2, (r["name"], L, c, t)
    assert r["last_loss"] and math.isfinite(r["last_loss"]), r
table = open(out + "/ablations.md").read().splitlines()
assert len([l for l in table if l.startswith("| ") and not l.startswith("| recipe")]) == n, table
# the last column: keys found at each passkey length, shortest first, as each row says
for r in rows:
    line = [l for l in table if l.startswith("| %s |" % r["name"])][0]
    want = " ".join(str(r["passkey"][L][0]) for L in sorted(r["passkey"], key=int))
    assert line.rstrip(" |").endswith("| " + want), (line, want)
yarn = json.load(open(out + "/yarn/adapter/config.json"))
assert "yarn" in json.dumps(yarn), "the yarn recipe's adapter does not carry yarn"
af1 = json.load(open(out + "/yarn-af1/adapter/config.json"))["rope_scaling"]
assert af1["rope_type"] == "yarn" and af1["factor"] == 4 and af1.get("attention_factor") == 1, af1
assert "attention_factor" not in yarn["rope_scaling"], yarn["rope_scaling"]
x8 = json.load(open(out + "/yarn-x8/adapter/config.json"))["rope_scaling"]
assert x8["rope_type"] == "yarn" and x8["factor"] == 8 and x8.get("attention_factor") == 1, x8
# ctx=640: trained at 640 tokens with YaRN x5 (640 / 128), evaluated at the driver's 512
lg = json.load(open(out + "/yarn-long/adapter/config.json"))["rope_scaling"]
assert lg["rope_type"] == "yarn" and lg["factor"] == 5, lg
cmds = [l for l in open(out + "/yarn-long/run.log") if l.startswith("$ ")]
assert "--ctx 640" in cmds[0] and "05_train" in cmds[0] and all("--ctx 512" in c for c in cmds[1:]), cmds
# the attention factor changes the model: its evaluation differs from the default YaRN's
by = {r["name"]: r for r in rows}
assert by["yarn-af1"]["perplexity"] != by["yarn"]["perplexity"], (by["yarn-af1"]["perplexity"], by["yarn"]["perplexity"])
assert by["yarn-x8"]["perplexity"] != by["yarn-af1"]["perplexity"], (by["yarn-x8"]["perplexity"], by["yarn-af1"]["perplexity"])
# schedule=cosine train=lora: 05_train's flags, a decaying lr (0 at the warmup's step 1, then
# the peak, then down), and an adapter of LoRA alone
cmd = [l for l in open(out + "/cosine-lora/run.log") if l.startswith("$ ")][0]
assert "05_train" in cmd and "--lr-scheduler cosine --no-train-embed --no-train-norms" in cmd, cmd
lrs = [float(l.split(",")[2]) for l in open(out + "/cosine-lora/adapter/train_log.csv").read().splitlines()[1:]]
assert len(lrs) == 3 and lrs[0] == 0 and lrs[1] > lrs[2] > 0, lrs
assert json.load(open(out + "/cosine-lora/adapter/adapter_config.json"))["modules_to_save"] is None
if "peer-cosine" in by:  # the peer runs transformers' cosine: the same lr at every step
    peer = [float(l.split(",")[2]) for l in open(out + "/peer-cosine/peer/train_log.csv").read().splitlines()[1:]]
    assert len(peer) == 3 and all(abs(a - b) <= 1e-6 * max(lrs) for a, b in zip(peer, lrs)), (peer, lrs)
first = [l for l in open(out + "/demo/run.log") if l.startswith("$ ")][0]
assert "--lr-scheduler" not in first and "--no-train" not in first, first  # the default recipe is LongLoRA's: constant, LoRA+
print("rows:", ", ".join("%s %.1f" % (r["name"], r["perplexity"]["512"]) for r in rows))
PYEOF
ablate --recipes "$TMP/recipes.txt" > "$TMP/again.log" 2>&1 && [ "$(grep -c 'done before' "$TMP/again.log")" = "$n_recipes" ] && ok \
  || bad "a second run did not resume: $(tail -n 3 "$TMP/again.log")"

# --table-only: the rows --out holds, in the recipes' order, a new recipe listed as not run
cp "$TMP/out/ablations.md" "$TMP/first.md"
{ cat "$TMP/recipes.txt"; echo "unrun engine=c steps=5"; } > "$TMP/recipes2.txt"
ablate --recipes "$TMP/recipes2.txt" --table-only > "$TMP/table.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && ! grep -q running "$TMP/table.log" && [ ! -e "$TMP/out/unrun" ] \
   && grep -q '^| unrun | not run |' "$TMP/out/ablations.md" \
   && [ "$(grep -c '^| ' "$TMP/out/ablations.md")" = "$(( $(grep -c '^| ' "$TMP/first.md") + 1 ))" ] \
   && diff <(grep -v '^| unrun' "$TMP/out/ablations.md") "$TMP/first.md" > /dev/null; then ok
else bad "--table-only: exit $rc, $(tail -n 3 "$TMP/table.log")"; fi
grep -q "$(pwd)/05_train" "$TMP"/out/*/run.log && bad "the run logs name this machine's path" || ok
# --table-only into a folder that does not exist yet: the table of unrun recipes, no traceback
"$PY" demo/ablate.py --recipes "$TMP/recipes2.txt" --table-only --out "$TMP/fresh/table" > "$TMP/fresh.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ "$(grep -c '| not run |' "$TMP/fresh/table/ablations.md" 2>/dev/null)" = "$((n_recipes + 1))" ]; then ok
else bad "--table-only into a new folder: exit $rc, $(tail -n 1 "$TMP/fresh.log")"; fi

refuse() { # WHY, a recipe file's text
  printf '%s\n' "$2" > "$TMP/bad.txt"
  out=$(ablate --recipes "$TMP/bad.txt" 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] && printf '%s' "$out" | grep -q '^ablate.py: '; then ok
  else bad "$1: exit $rc, said: $out"; fi
}
refuse "unknown key" "x engine=c colour=blue"
refuse "bad value" "x engine=c rope=ntk"
refuse "not a number" "x engine=c steps=many"
refuse "an unknown trained part" "x engine=c train=lora+bias"
refuse "yarn on the peer" "x engine=peer rope=yarn"
refuse "attention without yarn" "x engine=c attention=1.0"
refuse "attention not positive" "x engine=c rope=yarn attention=0"
refuse "scale without yarn" "x engine=c scale=8"
refuse "scale not a whole number" "x engine=c rope=yarn scale=2.5"
refuse "ctx without yarn" "x engine=c ctx=40960"
# hostile files: one sentence and exit 1, never a traceback
said() { # WHY, then the driver's arguments
  local why=$1; shift
  out=$("$PY" demo/ablate.py "$@" 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] && printf '%s' "$out" | grep -q '^ablate.py: '; then ok
  else bad "$why: exit $rc, said: $out"; fi
}
said "no recipes file" --recipes "$TMP/none.txt" --table-only --out "$TMP/hostile"
said "recipes file is a folder" --recipes "$TMP" --table-only --out "$TMP/hostile"
: > "$TMP/a-file"
said "output folder is a file" --recipes "$TMP/recipes.txt" --table-only --out "$TMP/a-file"
mkdir -p "$TMP/hostile/demo" && printf '{"name": ' > "$TMP/hostile/demo/row.json"
said "a cut row.json" --recipes "$TMP/recipes.txt" --table-only --out "$TMP/hostile"
printf '[1, 2]' > "$TMP/hostile/demo/row.json"
said "a row.json that is no row" --recipes "$TMP/recipes.txt" --table-only --out "$TMP/hostile"
refuse "ctx on the peer" "x engine=peer ctx=40960"
refuse "a name twice" $'x engine=c\nx engine=c'
refuse "held-out text" "x engine=c data=$TMP/eval.txt"
refuse "no such file" "x engine=c data=$TMP/none.txt"

echo "test_demo_ablate: $checks checks, $fails failures (seed $SEED; $n_recipes recipes$([ -z "$PEER_PY" ] && echo '; no torch: the peer recipe left out'))"
[ $fails -eq 0 ]
