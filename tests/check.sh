# The shell tests' one way to count checks (sourced: `. tests/check.sh`, from the repository root).
#   ok [WHAT]                   a check passed (says "ok   WHAT" where there is a WHAT)
#   bad WHY                     a check failed: says "FAIL WHY"
#   check WHAT CONDITION        CONDITION is a shell command line (run with eval): ok or bad WHAT
#   refused WHAT TEXT CMD...    CMD must end with exit 1 within 120 s and one "error: " line on
#                               stderr, the project's one error path, where TEXT (a basic
#                               regular expression, as grep reads it) matches; the stderr
#                               stays in CHECK_ERR for the checks after it
#   checks_summary NAME         prints "NAME: C checks, F failed"; true when none failed
# checks and fails count them; a test ends with `checks_summary NAME` or reads fails itself.
checks=0 fails=0
CHECK_ERR=
ok() { checks=$((checks + 1)); [ $# -eq 0 ] || echo "ok   $*"; }
bad() { checks=$((checks + 1)); fails=$((fails + 1)); echo "FAIL $*"; }
check() { if eval "$2"; then ok "$1"; else bad "$1"; fi; }
refused() {
  local what=$1 text=$2 rc; shift 2
  CHECK_ERR=$(timeout 120 "$@" 2>&1 >/dev/null); rc=$?
  if [ $rc -ne 1 ]; then bad "$what: exit $rc (want 1)"
  elif [ "$(grep -c '^error: ' <<<"$CHECK_ERR")" -ne 1 ]; then bad "$what: want one 'error: ' line"
  elif ! grep -q -- "$text" <<<"$CHECK_ERR"; then bad "$what: the sentence lacks '$text'"
  else ok "$what: $(grep '^error: ' <<<"$CHECK_ERR" | cut -c1-150)"; return 0; fi
  tail -n 3 <<<"$CHECK_ERR" | sed 's/^/  | /'
  return 1
}
checks_summary() { echo "$1: $checks checks, $fails failed"; [ $fails -eq 0 ]; }
