#!/usr/bin/env bash
# setup_test.sh: with everything installed, scripts/setup.sh installs nothing, says so, and finishes quickly.
. "$(dirname "$0")/lib.sh"
start=$(date +%s)
run ./scripts/setup.sh
elapsed=$(( $(date +%s) - start ))
[ "$rc" -eq 0 ] || fail "setup exited $rc: $err"
grep <<<"$err" -q "everything present, nothing installed" || fail "setup installed something: $err"
grep <<<"$out" -q "^MOETRAIN_TORCH_PYTHON=" || fail "setup did not print the torch python: $out"
[ "$elapsed" -lt 30 ] || fail "a setup run with everything present took ${elapsed}s"
finish
