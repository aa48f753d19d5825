#!/usr/bin/env bash
# Runs the fault-injection suite (tests/fault_injection.rs) and prints its report.
#
#   scripts/fault-suite.sh           short form (about a minute per group protocol; also
#                                    run by `cargo test`)
#   scripts/fault-suite.sh --long    long form (several minutes, thousands of transactions)
#   scripts/fault-suite.sh --seed N  another seed (combine with --long as needed)
#   scripts/fault-suite.sh --protocol classic|consumer
#                                    one group protocol only (default: both, one after the
#                                    other; `consumer` is KIP-848)
#   scripts/fault-suite.sh --tansu   against the tansu broker instead of the mock cluster
#                                    (same as TXN_SIDECAR_TEST_BROKER=tansu; duplicates
#                                    are then allowed: tansu drops commit metadata)
#
# Exit status is the suite's: 0 when lost, partial, aborted-but-delivered, reordered and
# duplicates after graceful handoffs are all zero and duplicates after SIGKILLs stay
# within what the kills could cause. Process logs and report.txt are kept under
# target/tmp/fault-suite-<form>-seed<seed>[-tansu]/.
set -euo pipefail
cd "$(dirname "$0")/.."

long=0
filter=()
while [ $# -gt 0 ]; do
  case "$1" in
    --long) long=1 ;;
    --seed) shift; export TXN_SIDECAR_FAULT_SEED="${1:?--seed needs a number}" ;;
    --protocol)
      shift
      case "${1:-}" in
        classic) filter=(--exact fault_injection_suite) ;;
        consumer) filter=(--exact kip848_fault_injection_suite) ;;
        *) echo "--protocol needs classic or consumer" >&2; exit 2 ;;
      esac ;;
    --tansu) export TXN_SIDECAR_TEST_BROKER=tansu ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --long, --seed N, --protocol classic|consumer, --tansu)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$long" = 1 ]; then
  export TXN_SIDECAR_FAULT_LONG=1
else
  unset TXN_SIDECAR_FAULT_LONG
fi

echo "cores: $(nproc 2>/dev/null || echo ?)  form: $([ "$long" = 1 ] && echo long || echo short)  broker: ${TXN_SIDECAR_TEST_BROKER:-mock}"
start=$(date +%s)
set +e
cargo test --test fault_injection -- --nocapture --test-threads=1 "${filter[@]}"
rc=$?
set -e
echo "fault suite finished in $(( $(date +%s) - start )) s (build included), exit $rc"
exit $rc
