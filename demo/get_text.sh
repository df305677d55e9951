#!/usr/bin/env bash
# Fetch the demo's long English text, once.
#
#   bash demo/get_text.sh           prints the text file's path as its last line
#
# Writes three files into $CACHE/text: austen.txt (all six novels), austen-train.txt (the
# first five, for fine-tuning) and austen-eval.txt (Persuasion, about 110k tokens, held out
# for perplexity and passkey haystacks).
#
# Jane Austen's six novels (public domain; about 4 MB, 718k words, 1.0M SmolLM2 tokens), as
# Debian ships them in the package r-cran-janeaustenr (data for R, MIT-licensed packaging):
#   1. apt-get download the .deb (no root needed, nothing is installed)
#   2. dpkg-deb -x it into a temporary folder
#   3. demo/extract_austen.py reads R's serialized data (standard-library Python, no R) and
#      writes the books as one plain-text file, one blank-line-separated book after another
# The result is cached ($LONGLORA_CACHE, default ~/.cache/longlora-c) and written atomically.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=r-cran-janeaustenr
CACHE=${LONGLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/longlora-c}
OUT=$CACHE/text/austen.txt
TRAIN=$CACHE/text/austen-train.txt
EVAL=$CACHE/text/austen-eval.txt
die() { echo "get_text.sh: $*" >&2; exit 1; }

if [ -s "$OUT" ] && [ -s "$TRAIN" ] && [ -s "$EVAL" ]; then echo "$OUT"; exit 0; fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
  || die "this needs a Debian or Ubuntu machine (apt-get and dpkg-deb) to fetch $PACKAGE"
command -v python3 >/dev/null || die "python3 is needed"
mkdir -p "$CACHE/text" || die "cannot create $CACHE/text"
tmp=$(mktemp -d "$CACHE/text/download.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

download() {  # apt-get download, quiet about apt's sandbox notice when run as root
  (cd "$tmp" && apt-get download -q "$PACKAGE" 2>&1) | grep -v -e 'unsandboxed as root' -e '^Get:' -e '^Fetched' >&2
  ls "$tmp"/${PACKAGE}_*.deb >/dev/null 2>&1
}
echo "get_text.sh: downloading $PACKAGE from Debian's archive" >&2
if ! download; then
  if [ "$(id -u)" = 0 ]; then  # a fresh machine has no package lists yet
    echo "get_text.sh: refreshing apt's package lists" >&2
    apt-get update -q >/dev/null || die "apt-get update failed"
    download || die "apt-get could not download $PACKAGE"
  else
    die "apt-get could not download $PACKAGE (its package lists may be empty: run 'sudo apt-get update' once)"
  fi
fi
debs=("$tmp"/${PACKAGE}_*.deb) # a glob, not `ls | head`, which pipefail can fail by SIGPIPE
deb=${debs[0]}
[ -f "$deb" ] || die "apt-get left no $PACKAGE .deb"
echo "get_text.sh: $(basename "$deb")" >&2
dpkg-deb -x "$deb" "$tmp/root" || die "could not unpack $deb"
python3 demo/extract_austen.py "$tmp/root" "$tmp/austen.txt" --train "$tmp/austen-train.txt" \
  --eval "$tmp/austen-eval.txt" >&2 || die "could not extract the text"
chars=$(wc -c < "$tmp/austen.txt")
[ "$chars" -gt 3000000 ] || die "the extracted text is only $chars bytes; expected about 4 MB"
mv "$tmp/austen-train.txt" "$TRAIN"
mv "$tmp/austen-eval.txt" "$EVAL"
mv "$tmp/austen.txt" "$OUT"
echo "$OUT"
