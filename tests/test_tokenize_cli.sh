#!/usr/bin/env bash
# The 01_tokenize command line: ids on one line (and --pieces), --encode-file / --decode-file
# round trips through a token file (with the progress line on a large input), a model folder
# as --tokenizer, BOS from tokenizer_config.json, and LLaMA-2's exact ids for one sentence
# when ../shared/data is here.
# The small models are the fuzz seeds committed in tests/fuzz_corpus.
set -u
cd "$(dirname "$0")/.."
. tests/check.sh
[ -x ./01_tokenize ] || { echo "FAIL: ./01_tokenize is not built (make 01_tokenize)"; exit 1; }
out=build/tests/tok/cli
rm -rf "$out"; mkdir -p "$out"
spm=tests/fuzz_corpus/fuzz_tokenizer_model/small_bpe.model
bbpe=tests/fuzz_corpus/fuzz_tokenizer_json/small_bytelevel.json
bbpe3=tests/fuzz_corpus/fuzz_tokenizer_json/llama3_style.json
llama=../shared/data/llama2-tokenizer/tokenizer.model
book=../shared/data/text/pride-and-prejudice.txt

# a text with every kind of character, written byte-exactly
printf 'The and the an\n\n  two  spaces\ttab \xc3\xa9t\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\xa6\x99 123 4567\r\n<|endoftext|> end' > "$out/sample.txt"

for tok in "$spm" "$bbpe" $( [ -f "$llama" ] && echo "$llama" ); do
  name=$(basename "$tok")
  ./01_tokenize --tokenizer "$tok" --encode-file "$out/sample.txt" --out "$out/$name.bin" 2>"$out/err.txt" || bad "$name: --encode-file failed: $(cat "$out/err.txt")"
  [ "$(head -c 4 "$out/$name.bin")" = "LLTK" ] || bad "$name: the token file has no LLTK magic"
  ./01_tokenize --tokenizer "$tok" --decode-file "$out/$name.bin" > "$out/$name.txt" || bad "$name: --decode-file failed"
  cmp -s "$out/sample.txt" "$out/$name.txt" || bad "$name: decode(encode(file)) differs from the file"
  ids=$(./01_tokenize --tokenizer "$tok" "The and the an")
  [ -n "$ids" ] && [ "$(echo "$ids" | wc -l)" = 1 ] || bad "$name: ids are not one line: '$ids'"
  [ "$(./01_tokenize --tokenizer "$tok" --pieces "The and the an" | wc -l)" = 2 ] || bad "$name: --pieces does not add a line of pieces"
done

# a folder holding tokenizer.json works as --tokenizer and gives the same ids
mkdir -p "$out/model"; cp "$bbpe3" "$out/model/tokenizer.json"
[ "$(./01_tokenize --tokenizer "$out/model" "the 1234 an")" = "$(./01_tokenize --tokenizer "$bbpe3" "the 1234 an")" ] || bad "a model folder gives other ids than its tokenizer.json"

# tokenizer_config.json beside tokenizer.json names BOS and EOS (either spelling)
mkdir -p "$out/withcfg"; cp "$bbpe" "$out/withcfg/tokenizer.json"
printf '{"bos_token": {"content": "<|endoftext|>", "lstrip": false}, "eos_token": "<|endoftext|>"}' > "$out/withcfg/tokenizer_config.json"
got=$(./01_tokenize --tokenizer "$out/withcfg" --bos " the")
[ "$got" = "262 259" ] || bad "BOS from tokenizer_config.json: got '$got', want '262 259'"
[ "$(./01_tokenize --tokenizer "$bbpe" --bos " the")" = "259" ] || bad "a tokenizer.json without BOS still added one"
printf '{"bos_token": ' > "$out/withcfg/tokenizer_config.json"
./01_tokenize --tokenizer "$out/withcfg" "x" >/dev/null 2>"$out/err.txt" && bad "a broken tokenizer_config.json was accepted"
grep -q "^error: .*tokenizer_config.json" "$out/err.txt" || bad "a broken tokenizer_config.json gave: $(cat "$out/err.txt")"

if [ -f "$llama" ]; then
  got=$(./01_tokenize --tokenizer "$llama" --bos "Hello world")
  [ "$got" = "1 15043 3186" ] || bad "LLaMA-2 'Hello world' with BOS gave '$got', want '1 15043 3186'"
fi
if [ -f "$llama" ] && [ -f "$book" ]; then
  # 12 copies of the book (8.7 MB): the progress line appears, the round trip is exact
  for i in $(seq 12); do cat "$book"; done > "$out/big.txt"
  ./01_tokenize --tokenizer "$llama" --encode-file "$out/big.txt" --out "$out/big.bin" 2>"$out/err.txt" || bad "encoding the big file failed"
  grep -q "^encoding: " <(tr '\r' '\n' < "$out/err.txt") || bad "no progress line for a large input: $(cat "$out/err.txt")"
  grep "^wrote" "$out/err.txt"
  ./01_tokenize --tokenizer "$llama" --decode-file "$out/big.bin" > "$out/big.dec" && cmp -s "$out/big.txt" "$out/big.dec" || bad "the big file does not round-trip"
  rm -f "$out/big.txt" "$out/big.bin" "$out/big.dec"
fi
[ $fails -eq 0 ] || exit 1
echo "CLI: ids, pieces, token-file round trips and folder loading work"
