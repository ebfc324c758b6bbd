#!/usr/bin/env bash
# Builds the parser fuzz target with libFuzzer on stable Rust and runs it.
#
#   bash fuzz/run.sh [SECONDS] [extra libFuzzer options…]
#
# SECONDS (default 60) bounds the run (-max_total_time). The corpus is seeded from
# fixtures/ (each file twice: with flag byte 0x00 and 0x0f, see fuzz_targets/parse.rs)
# into fuzz/corpus/parse (git-ignored); crashes go to fuzz/artifacts/parse/. Exits
# non-zero when libFuzzer finds a crash, a timeout or an out-of-memory input.
#
# No nightly: the coverage instrumentation comes from stable `-C` flags (LLVM's
# sanitizer-coverage pass), and libfuzzer-sys builds libFuzzer with the machine's C++
# compiler. No AddressSanitizer (that needs -Zsanitizer); debug assertions and overflow
# checks are on (fuzz/Cargo.toml's release profile).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
target="$(rustc -vV | sed -n 's/^host: //p')"
# With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts
# or proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
cargo build --release --target "$target" --bin parse
bin="$CARGO_TARGET_DIR/$target/release/parse"

corpus=corpus/parse
mkdir -p "$corpus" artifacts/parse
for f in ../fixtures/*.txt ../fixtures/errors/*; do
  [ -f "$f" ] || continue
  # Large fixtures make slow seeds; the small ones cover the same forms.
  [ "$(stat -c %s "$f")" -le 20000 ] || continue
  name="$(basename "$f")"
  { printf '\x00'; cat "$f"; } >"$corpus/seed-0-$name"
  { printf '\x0f'; cat "$f"; } >"$corpus/seed-f-$name"
done

# -timeout: an input slower than 30 s is reported as a finding (10 s until session 10:
# see finding 6 in README.md).
exec "$bin" "$corpus" -artifact_prefix=artifacts/parse/ -max_len=20000 -timeout=30 \
  -rss_limit_mb=4096 -max_total_time="$secs" -print_final_stats=1 "$@"
