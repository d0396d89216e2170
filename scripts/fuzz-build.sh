#!/usr/bin/env bash
# Builds (does not run) the cargo-fuzz targets in fuzz/, so they keep
# compiling as src/ changes. Not part of CI: installing cargo-fuzz is too slow
# there. Skips, successfully, when cargo-fuzz is not installed
# (`cargo install cargo-fuzz --locked`). cargo-fuzz needs nightly flags; on
# the stable toolchain RUSTC_BOOTSTRAP=1 enables them. Pass extra
# `cargo fuzz build` arguments through, e.g. `-s none` or a target name.
# See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-build: cargo-fuzz is not installed; skipping (cargo install cargo-fuzz --locked)"
    exit 0
fi

cd fuzz
RUSTC_BOOTSTRAP=1 cargo fuzz build "$@"
echo "fuzz-build: built $(cargo fuzz list | tr '\n' ' ')"
