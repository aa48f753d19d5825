#!/bin/sh
# Runs a sidecar binary under callgrind, counting instructions on the consumer thread's
# loop only (`pipeline::poll::consume` and all it calls), or in the whole process with
# CG_TOGGLE= (empty). Pass it to the benchmark as the sidecar, e.g. for the staging run
# (BENCHMARKS.md, change 9):
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
CG_TOGGLE="${CG_TOGGLE-txn_sidecar::pipeline::poll::consume*}"
command -v valgrind >/dev/null || { echo "callgrind-sidecar: valgrind not found (apt-get install valgrind)" >&2; exit 1; }
mkdir -p "$CG_OUT"
if [ -n "$CG_TOGGLE" ]; then
  exec valgrind --tool=callgrind --callgrind-out-file="$CG_OUT/sidecar.%p.out" \
    --toggle-collect="$CG_TOGGLE" "$CG_BIN" "$@"
fi
exec valgrind --tool=callgrind --callgrind-out-file="$CG_OUT/sidecar.%p.out" "$CG_BIN" "$@"
