#!/usr/bin/env bash
# scripts/test.sh - the whole test suite, as CI runs it (`.ci/run` calls this).
#
# 1. installs missing Debian packages (scripts/install-deps.sh);
# 2. builds the release configuration in build/ and runs `meson test`;
# 3. builds the sanitizer configuration (-Db_sanitize=address,undefined) in
#    build-asan/ and runs the suite again (skip with --no-asan);
# 4. prints one closing line "N passed, N failed" over both runs.
set -uo pipefail
cd "$(dirname "$0")/.."

asan=1
for a in "$@"; do
  case "$a" in
    --no-asan) asan=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "test.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

scripts/install-deps.sh || exit 1

jobs=$(nproc 2>/dev/null || echo 2)
passed=0; failed=0; skipped=0

run_suite() { # build-dir, meson-setup-args...
  local dir=$1; shift
  if [ ! -f "$dir/build.ninja" ]; then
    meson setup "$dir" "$@" >/dev/null || { echo "test.sh: meson setup $dir failed" >&2; meson setup "$dir" "$@"; return 1; }
  fi
  ninja -C "$dir" || return 1
  meson test -C "$dir" --print-errorlogs --num-processes "$jobs"
  local rc=$?
  local counts
  counts=$(/usr/bin/python3 - "$dir/meson-logs/testlog.json" <<'PY'
import json, sys
p = f = s = 0
for line in open(sys.argv[1]):
    r = json.loads(line).get("result")
    if r in ("OK", "EXPECTEDFAIL"): p += 1
    elif r == "SKIP": s += 1
    else: f += 1
print(p, f, s)
PY
)
  read -r p f s <<<"$counts"
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
  return $rc
}

status=0
run_suite build -Dbuildtype=release || status=1
if [ "$asan" = 1 ]; then
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    run_suite build-asan -Db_sanitize=address,undefined -Dbuildtype=debugoptimized -Db_lundef=false || status=1
fi
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ] || status=1
exit $status
