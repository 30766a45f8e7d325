#!/usr/bin/env bash
# Bounded fuzzing of the SQL gate, the manifest/policy validators and the
# ledger decoders (see src/fuzzing.rs). Usage:
#
#   scripts/fuzz.sh [seconds-per-target] [target ...]
#
# Needs a nightly toolchain (installed with rustup if missing) and
# cargo-fuzz (installed if missing). New crashes are copied into
# fuzz/regressions/<target>/, which `cargo test` replays on stable; the
# script then exits 1. FUZZ_SANITIZER=address turns on AddressSanitizer
# (slower; the crate has no unsafe code of its own, so the default is none).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sql_gate validators ledger_record)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/tmp/frostglass-fuzz-target}"

status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "fuzz/regressions/$t"
  # A scratch copy of the seeds: what the run discovers stays out of the repo.
  work="$(mktemp -d)"
  cp "fuzz/corpus/$t/"* "$work/"
  before="$(ls "fuzz/artifacts/$t" | wc -l)"
  echo "== $t: ${seconds}s"
  if ! cargo +nightly fuzz run --sanitizer "${FUZZ_SANITIZER:-none}" "$t" "$work" -- \
      -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -max_len=65536; then
    status=1
  fi
  for crash in "fuzz/artifacts/$t/"*; do
    saved="fuzz/regressions/$t/$(basename "$crash")"
    [ -e "$crash" ] && [ ! -e "$saved" ] || continue
    cp "$crash" "$saved" && echo "new regression input: $saved"
  done
  [ "$(ls "fuzz/artifacts/$t" | wc -l)" -eq "$before" ] || status=1
  rm -rf "$work"
done
exit "$status"
