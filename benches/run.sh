#!/usr/bin/env bash
# lbaudit's benchmarks in one run, on this machine:
#
#   bash benches/run.sh [--runs N] [--no-scale]
#
# Builds the release binary, runs `cargo bench --bench simulate` (simulator vs a bare
# loop of its generator), then `cargo bench --bench report`, which generates the large
# kube-proxy dumps (deterministic; kept in $LBAUDIT_BENCH_DIR, default
# target/lbaudit-bench, about 300 MB with the scale runs) and prints one table of
# figures, targets and PASS/MISS, then the scale runs (100,000 services, one service of
# 20,000 endpoints, 30,000 services with small iptables-save -c counters). Peak memory needs /usr/bin/time (Debian package `time`);
# iptables-restore --test needs the `iptables` package and root (for its network
# namespace). Takes about 6 minutes on 2 cores. Run it on an otherwise idle machine:
# wall times move with other load (the load average is printed at the start and end,
# and CPU time beside the wall time of lbaudit's runs).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=5
scale=--scale
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --no-scale) scale=""; shift ;;
    *) echo "usage: bash benches/run.sh [--runs N] [--no-scale]" >&2; exit 2 ;;
  esac
done
target_dir="${CARGO_TARGET_DIR:-target}"
export LBAUDIT_BENCH_DIR="${LBAUDIT_BENCH_DIR:-$PWD/$target_dir/lbaudit-bench}"
mkdir -p "$LBAUDIT_BENCH_DIR"
[ -x /usr/bin/time ] || echo "note: /usr/bin/time missing: no peak memory (apt-get install time)" >&2

cargo build --release
echo "== cargo bench --bench simulate"
cargo bench --bench simulate | tee "$LBAUDIT_BENCH_DIR/simulate.txt"
echo
echo "== cargo bench --bench report"
LBAUDIT_SIM_BENCH_OUTPUT="$LBAUDIT_BENCH_DIR/simulate.txt" \
  cargo bench --bench report -- --runs "$runs" $scale
