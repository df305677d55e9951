#!/usr/bin/env bash
# `make test`'s set-up: the reference libraries the tests compare against, in a virtual
# environment of their own (never used by the product at run time).
#   bash tests/venv.sh VENV REQUIREMENTS
# makes VENV with python3 where it is missing, installs REQUIREMENTS into it with pip and exits
# 0; where that cannot work (no python3, no venv module, no network) it says so in one line,
# leaves no half-made VENV behind and exits 1, and the tests that need the libraries skip.
# pip's own output goes to build/logs/venv.log.
set -u
cd "$(dirname "$0")/.." || exit 1
venv=${1:?usage: tests/venv.sh VENV REQUIREMENTS}
req=${2:?usage: tests/venv.sh VENV REQUIREMENTS}
log=build/logs/venv.log
mkdir -p build/logs
: > "$log"
cannot() { echo "make test: $*: the tests that need $req skip"; exit 1; }

made=
if ! "$venv/bin/python" -c '' 2>/dev/null; then
  command -v python3 >/dev/null || cannot "no python3 to make $venv with"
  echo "make test: making $venv for the tests' reference libraries ($req)"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >>"$log" 2>&1; then
    rm -rf "$venv"
    cannot "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  made=1
fi
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >>"$log" 2>&1; then
  [ -n "$made" ] && rm -rf "$venv" # an empty .venv would hide what python3 itself has
  cannot "pip could not install $req into $venv (offline? $log says why)"
fi
[ -n "$made" ] && echo "make test: $req installed into $venv"
exit 0
