#!/bin/sh
# Runs a sidecar binary under callgrind, counting instructions on the consumer thread's
# loop and the reader threads only (`pipeline::poll::consume`, `pipeline::readers::run`
# and all they call), or in the whole process with CG_TOGGLE= (empty). CG_TOGGLE takes
# comma-separated function patterns. Pass it to the benchmark as the sidecar, e.g. for the staging run
# (docs/benchmarks-history.md, change 9):
#
#   CG_BIN=target/release/txn-sidecar CG_OUT=/tmp/cg \
#     scripts/bench.sh --only staging --reps 1 --stage-records 2500 \
#       --sidecar-bin scripts/callgrind-sidecar.sh
#   callgrind_annotate --inclusive=yes /tmp/cg/sidecar.<pid>.out | head -40
#
# Instruction counts are repeatable whatever else the machine does; wall-clock figures
# from such a run are not meaningful (valgrind runs the process about 50 times slower).
set -eu
: "${CG_BIN:=target/release/txn-sidecar}"
: "${CG_OUT:=target/bench/callgrind}"
CG_TOGGLE="${CG_TOGGLE-txn_sidecar::pipeline::poll::consume*,txn_sidecar::pipeline::readers::run*}"
command -v valgrind >/dev/null || { echo "callgrind-sidecar: valgrind not found (apt-get install valgrind)" >&2; exit 1; }
mkdir -p "$CG_OUT"
if [ -n "$CG_TOGGLE" ]; then
  toggles=""
  set -f  # the patterns hold `*`: no file-name expansion
  old_ifs="$IFS"; IFS=","
  for t in $CG_TOGGLE; do toggles="$toggles --toggle-collect=$t"; done
  IFS="$old_ifs"
  # shellcheck disable=SC2086 # one argument per pattern
  exec valgrind --tool=callgrind --callgrind-out-file="$CG_OUT/sidecar.%p.out" \
    $toggles "$CG_BIN" "$@"
fi
exec valgrind --tool=callgrind --callgrind-out-file="$CG_OUT/sidecar.%p.out" "$CG_BIN" "$@"
