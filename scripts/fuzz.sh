#!/usr/bin/env bash
# Fuzzes the gateway's request parsing and validation (fuzz/fuzz_targets/
# parse_request.rs) for SECONDS (default 600), with libFuzzer and
# AddressSanitizer through cargo-fuzz, which needs nightly Rust: both are
# installed when missing.
#
#   scripts/fuzz.sh [SECONDS]        grows the kept corpus, fuzz/corpus/parse_request
#   FUZZ_SCRATCH=1 scripts/fuzz.sh   leaves the kept corpus as it is (the tests
#                                    run it so): new inputs go to a temp dir
#
# A crash stops the run and leaves the input in fuzz/artifacts/parse_request.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "Installing the nightly Rust toolchain (cargo-fuzz needs it)." >&2
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "Installing cargo-fuzz." >&2
  cargo install cargo-fuzz --locked
fi

kept=corpus/parse_request
corpora=("$kept")
if [ -n "${FUZZ_SCRATCH:-}" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  # libFuzzer writes new inputs to the first directory only.
  corpora=("$scratch" "$kept")
fi
cd fuzz
cargo +nightly fuzz run parse_request "${corpora[@]}" -- \
  -max_total_time="$seconds" -max_len=8192 -timeout=10 -print_final_stats=1
