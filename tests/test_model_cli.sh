#!/usr/bin/env bash
# test_model_cli.sh: the 02_model program end to end.
#  1. --tokens over the llama2_like fixture's rows in windows of N tokens: the printed loss
#     must match HF's language-model loss on those rows (tests/ref/make_model_fixtures.py)
#     within 1e-5 relative, over B*(N-1) predicted positions.
#  2. --text-file and --text with a tokenizer: a tiny SentencePiece BPE model is trained
#     here with the sentencepiece library ($PYTHON), put beside the fixture's weights, and
#     the loss over a text must equal the loss over the ids sentencepiece itself gives for
#     that text with BOS in front (written as a token file); --top 3 prints 3 probabilities
#     that sum to at most 1. (Without sentencepiece in $PYTHON the test ends as skipped.)
#  3. Bad input ends with a non-zero exit and one line "error: ..." naming the input.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BIN=./02_model
FIX=tests/fixtures/model/llama2_like
[ -x "$BIN" ] || { echo "skip: $BIN is not built (run make)"; exit 77; }
[ -f "$FIX/lm_tokens.lltk" ] || { echo "skip: fixture $FIX is missing"; exit 77; }
OUT=$(mktemp -d build/tests/model_cli_XXXXXX 2>/dev/null || { mkdir -p build/tests && mktemp -d build/tests/model_cli_XXXXXX; })
trap 'rm -rf "$OUT"' EXIT
. tests/check.sh
no_spm=0

# 1. loss over a token file against HF
read -r want_loss n_window < "$FIX/lm_loss.txt"
line=$("$BIN" --model "$FIX" --tokens "$FIX/lm_tokens.lltk" --window "$n_window" 2>/dev/null | tail -n 1)
echo "02_model: $line (HF: loss $want_loss over 24 positions)"
got_loss=$(echo "$line" | awk '$1=="loss" && $3=="ppl" && $5=="tokens" {print $2}')
got_tokens=$(echo "$line" | awk '{print $6}')
close='BEGIN{d=a-b; if(d<0)d=-d; exit !(a!="nan" && d<=1e-5*b)}'
check "token-file loss matches HF within 1e-5" 'awk -v a="${got_loss:-nan}" -v b="$want_loss" "$close"'
check "24 predicted positions" '[ "${got_tokens:-0}" = 24 ]'

# 2. text through a tokenizer (sentencepiece trains a tiny one: 64 pieces like the model)
if "$PY" -c "import sentencepiece" 2>/dev/null; then
  cp "$FIX/config.json" "$FIX/model.safetensors" "$OUT/"
  "$PY" - "$OUT" <<'EOF'
import struct, sys
import sentencepiece as spm
out = sys.argv[1]
lines = ["the cat sat on the mat and the dog sat on the log",
         "a bird in the hand is worth two in the bush",
         "to be or not to be that is the question",
         "all that glitters is not gold", "the quick brown fox jumps over the lazy dog"] * 20
spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=out + "/tokenizer", vocab_size=64,
                               model_type="bpe", character_coverage=1.0, byte_fallback=False,
                               bos_id=1, eos_id=2, unk_id=0, pad_id=-1, normalization_rule_name="identity",
                               minloglevel=2)
text = "the dog sat on the mat and the cat sat on the log"
with open(out + "/text.txt", "w") as f:
    f.write(text)
sp = spm.SentencePieceProcessor(model_file=out + "/tokenizer.model")
ids = [sp.bos_id()] + sp.encode(text)
with open(out + "/text.lltk", "wb") as f:
    f.write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + struct.pack(f"<{len(ids)}H", *ids))
EOF
  a=$("$BIN" --model "$OUT" --text-file "$OUT/text.txt" 2>/dev/null | tail -n 1)
  b=$("$BIN" --model "$OUT" --tokens "$OUT/text.lltk" 2>/dev/null | tail -n 1)
  echo "text: $a | sentencepiece ids: $b"
  check "--text-file equals sentencepiece's ids with BOS" '[ -n "$a" ] && [ "$a" = "$b" ]'
  top=$("$BIN" --model "$OUT" --top 3 --text "the cat sat on the" 2>/dev/null)
  echo "$top"
  ranked='{s+=$3; n++; if ($1!=n || $3<0 || (n>1 && $3>prev)) bad=1; prev=$3} END{exit !(n==3 && s<=1.000001 && !bad)}'
  check "--top 3 prints 3 ranked probabilities" 'awk "$ranked" <<<"$top"'
else
  no_spm=1
fi

# 3. bad input: non-zero exit, one line naming the input
refused "no such model folder" "$OUT/none/config.json" "$BIN" --model "$OUT/none" --tokens "$FIX/lm_tokens.lltk"
mkdir -p "$OUT/m2" && cp "$FIX/config.json" "$OUT/m2/" && head -c 1000 "$FIX/model.safetensors" > "$OUT/m2/model.safetensors"
refused "truncated weights" "model.safetensors" "$BIN" --model "$OUT/m2" --tokens "$FIX/lm_tokens.lltk"
refused "missing token file" "nothing.lltk" "$BIN" --model "$FIX" --tokens "$OUT/nothing.lltk"
refused "no tokenizer in the folder" "$FIX" "$BIN" --model "$FIX" --text "hello"
refused "bad --window" "--window" "$BIN" --model "$FIX" --tokens "$FIX/lm_tokens.lltk" --window 0x
printf 'LLTK\1\0\0\0\2\0\0\0\2\0\0\0\0\0\0\0\x05\x00\x00\x01' > "$OUT/big.lltk"
refused "token id outside the vocabulary" "has id 256" "$BIN" --model "$FIX" --tokens "$OUT/big.lltk"

checks_summary test_model_cli || exit 1
if [ $no_spm -eq 1 ]; then echo "skip: $PY has no sentencepiece, so the --text-file checks did not run (the others passed)"; exit 77; fi
