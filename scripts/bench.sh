#!/usr/bin/env bash
# Benchmarks (see BENCHMARKS.md): release build, then the benchmark driver, which starts
# the mock Kafka, the sidecar, a sink app, a load generator and a bare consumer as
# separate processes, measures every figure next to its baseline in the same run,
# repeats, and prints a Markdown table of medians (min–max).
#
#   scripts/bench.sh                 # 3 repetitions, ~11 minutes on 2 cores
#   scripts/bench.sh --quick         # 1 smaller repetition, a smoke run (~2 minutes)
#   scripts/bench.sh --reps 5 --only staging,delivery
#
# Options: --reps N, --quick, --only staging,staging-key-prefix,delivery,latency,memory,rebalance,
#   --sidecar-bin PATH (another build to measure), --kafka k=v,k=v (extra librdkafka
#   properties for every consumer, sidecar and bare alike), --latency-max-rate N,
#   --out DIR (default target/bench: results.json, table.md, logs/),
#   --stage-partitions N, --stage-records N (per partition), --deliver-partitions N,
#   --deliver-txns N (per partition), --latency-secs N, --mem-records N (per partition).
# Needs: a Rust toolchain and the build dependencies of rdkafka (cmake is not needed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "==> cargo build --release (txn-sidecar and the benchmark driver)" >&2
# One cargo invocation; the driver is run directly afterwards so cargo's build lock is
# not held while measuring.
driver="$(cargo build --release --locked --bin txn-sidecar --bench sidecar --message-format=json-render-diagnostics |
  sed -n 's/.*"target":{[^}]*"name":"sidecar".*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
if [ -z "$driver" ] || [ ! -x "$driver" ]; then
  echo "bench.sh: could not find the benchmark executable in cargo's output" >&2
  exit 1
fi
if [ ! -x target/release/txn-sidecar ]; then
  echo "bench.sh: target/release/txn-sidecar missing after the build" >&2
  exit 1
fi

echo "==> $driver run $*" >&2
echo "    machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" >&2
exec "$driver" run --sidecar-bin "$root/target/release/txn-sidecar" "$@"
