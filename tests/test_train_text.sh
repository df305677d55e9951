#!/usr/bin/env bash
# 05_train on text through a real tokenizer, checked against the HF tokenizers library.
#
# The Python side trains a small byte-level BPE tokenizer.json (with <s> and </s>) on the
# GPL-3 text (or a generated text), writes three documents (a .txt file and a .jsonl file
# with two records) and the stream it expects 05_train to build from them: for each
# document <s> + the library's ids + </s>, in order. Checks:
#   1. `05_train --save-tokens` writes exactly that stream (byte-identical token file);
#   2. training on the text and on the saved token file gives identical losses (same data);
#   3. SFT with --template llama2-chat and alpaca runs through the tokenizer, loss finite,
#      and a record whose prompt does not fit --ctx is skipped with a warning;
#   4. --data text with --init random and no tokenizer is refused with a sentence.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
if ! "$PY" -c "import tokenizers" 2>/dev/null; then
  echo "skip: the tokenizers library is not installed for $PY (make test installs tests/requirements.txt into .venv)"
  exit 77
fi
make -s 05_train >/dev/null || { echo "FAIL: cannot build 05_train"; exit 1; }
mkdir -p build
T=$(mktemp -d build/test_train_text_XXXXXX) || exit 1
. tests/check.sh

"$PY" - "$T" <<'EOF' || { echo "FAIL: the reference side failed"; exit 1; }
import json, os, random, struct, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
out = sys.argv[1]
src = "/usr/share/common-licenses/GPL-3"
if os.path.exists(src):
    text = open(src, encoding="utf-8").read()
else:
    rng = random.Random(5)
    words = "the model reads a long text and learns each token with care on the CPU every day".split()
    text = " ".join(rng.choice(words) for _ in range(8000))
os.makedirs(out + "/tok")
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              show_progress=False)
tok.train_from_iterator([text], trainer)
tok.save(out + "/tok/tokenizer.json")
json.dump({"bos_token": "<s>", "eos_token": "</s>"}, open(out + "/tok/tokenizer_config.json", "w"))
bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
docs = [text[: len(text) // 2], text[len(text) // 2 :], "caf\u00e9 \u2014 na\u00efve\n\ttabs and  spaces"]
open(out + "/a.txt", "w", encoding="utf-8").write(docs[0])
with open(out + "/b.jsonl", "w", encoding="utf-8") as f:
    for d in docs[1:]:
        f.write(json.dumps({"text": d, "id": 1}) + "\n")
ids = []
for d in docs:
    ids += [bos] + tok.encode(d, add_special_tokens=False).ids + [eos]
with open(out + "/want.tok", "wb") as f:
    f.write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + struct.pack("<%dH" % len(ids), *ids))
recs = [{"instruction": "Summarise the licence in one line.", "input": "", "output": "Share and keep it free."},
        {"instruction": "Translate to English", "input": "Bonjour le monde", "output": "Hello world"},
        {"instruction": "x " * 300, "output": "too long a prompt"}]
json.dump(recs, open(out + "/sft.json", "w"))
print("reference: %d tokens, vocabulary %d, bos %d eos %d" % (len(ids), tok.get_vocab_size(), bos, eos))
EOF

common="--init random --shape tiny --tokenizer $T/tok --ctx 64 --batch 2 --lr 3e-3 --warmup 0 --quiet"
./05_train $common --data "$T/a.txt" "$T/b.jsonl" --save-tokens "$T/got.tok" --max-steps 4 --out "$T/o1" >"$T/o1.log" 2>&1
check "text run exits 0" "[ $? -eq 0 ]"
check "--save-tokens writes <s> doc </s> for each document, ids equal to the tokenizers library's" "cmp -s '$T/want.tok' '$T/got.tok'"
./05_train $common --data "$T/got.tok" --max-steps 4 --out "$T/o2" >"$T/o2.log" 2>&1
check "token-file run exits 0" "[ $? -eq 0 ]"
check "text and its token file train identically" "cmp -s <(cut -d, -f1,2 '$T/o1/train_log.csv') <(cut -d, -f1,2 '$T/o2/train_log.csv')"
for tmpl in llama2-chat alpaca; do
  ./05_train $common --ctx 128 --sft "$T/sft.json" --template $tmpl --max-steps 3 --out "$T/s-$tmpl" >"$T/s-$tmpl.log" 2>&1
  rc=$?
  check "SFT ($tmpl) exits 0" "[ $rc -eq 0 ]"
  check "SFT ($tmpl) losses are finite" "awk -F, 'NR>1 && (\$2==\"nan\" || \$2==\"inf\" || \$2==\"-nan\") {bad=1} END {exit bad || NR != 4}' '$T/s-$tmpl/train_log.csv'"
  check "SFT ($tmpl) warns about the record that does not fit" "grep -q 'skipped' '$T/s-$tmpl.log'"
done
./05_train --init random --shape tiny --data "$T/a.txt" --ctx 64 --out "$T/o3" >"$T/o3.log" 2>&1
rc=$?
check "text without a tokenizer is refused with one sentence" "[ $rc -eq 1 ] && grep -q '^error: .*tokenizer' '$T/o3.log'"

if [ $fails -eq 0 ]; then rm -rf "$T"; echo "test_train_text: text and SFT through a real tokenizer match the tokenizers library"
else echo "logs kept in $T"; echo "test_train_text: FAILED"; exit 1; fi
