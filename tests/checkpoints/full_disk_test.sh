#!/usr/bin/env bash
# full_disk_test.sh MOETRAIN: checkpoints on a small tmpfs (7 MiB; a tiny 4-rank checkpoint is ~4.7 MiB). The first
# save fits, the second finds the disk full: every rank exits non-zero with one clear "No space left on device"
# line — no segfault, no stack trace — and the first checkpoint stays `latest` and verifies. Needs a tmpfs mount
# (root); where none can be mounted the test reports itself skipped (exit 77).
. "$(dirname "$0")/../cli/lib.sh"
bin=$1
dir=$(mktemp -d)
mnt="$dir/full"
mkdir -p "$mnt"
if ! mount -t tmpfs -o size=7m tmpfs "$mnt" 2>/dev/null; then
  echo "cannot mount a tmpfs here: skipped"
  rm -rf "$dir"
  exit 77
fi
trap 'umount "$mnt" 2>/dev/null; rm -rf "$dir"' EXIT
run mpi -np 4 "$bin" train --config configs/tiny.yaml --set logging.dir="$dir" --set train.steps=3 \
    --set train.eval_interval=0 --set train.peak_flops=1e9 --set checkpoint.interval=1 --set checkpoint.dir="$mnt/ck"
[ "$rc" -ne 0 ] || fail "a full disk went unnoticed"
[ "$rc" -lt 128 ] || fail "exit status $rc: a signal death"
grep -q "No space left on device" <<<"$err" || fail "no clear error: $err"
[ "$(printf '%s\n' "$err" | grep -c .)" -eq 1 ] || fail "expected one error line: $err"
! grep -qiE "segmentation|backtrace|frame #|signal" <<<"$err$out" || fail "a crash after the error: $err"
[ "$(cat "$mnt/ck/latest" 2>/dev/null)" = step_0000001 ] || fail "latest: $(cat "$mnt/ck/latest" 2>/dev/null)"
run "$bin" ckpt verify "$mnt/ck"
[ "$rc" -eq 0 ] || fail "the first checkpoint does not verify: $err"
finish
