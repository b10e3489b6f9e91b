#!/bin/sh
# Builds target/debian/metalbond_<version>-1_<arch>.deb (and the -dbgsym package).
#
#   deploy/build-deb.sh            binary for this machine's glibc
#   deploy/build-deb.sh --portable binary for glibc 2.28 (Debian 10+, Ubuntu 20.04,
#                                  RHEL 8) via cargo-zigbuild and zig
#
# Steps: build the binary, run `metalbond generate-docs` into
# target/.../release/generated (man pages and shell completions from the clap
# definition, so they always match the binary), then `cargo deb --no-build`
# with [package.metadata.deb] of Cargo.toml. Needs cargo-deb (and for
# --portable cargo-zigbuild plus `pip install ziglang`).
set -eu
cd "$(dirname "$0")/.."

TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

case "${1:-}" in
--portable)
    # An old glibc as the floor: the binary links against 2.28's symbols.
    cargo zigbuild --locked --release --target "$TRIPLE.2.28" --bin metalbond
    OUT="$TARGET_DIR/$TRIPLE/release"
    TARGET_ARG="--target=$TRIPLE --variant=portable"
    ;;
"")
    cargo build --locked --release --bin metalbond
    OUT="$TARGET_DIR/release"
    TARGET_ARG=""
    ;;
*)
    echo "usage: deploy/build-deb.sh [--portable]" >&2
    exit 2
    ;;
esac

rm -rf "$OUT/generated"
"$OUT/metalbond" generate-docs "$OUT/generated" >/dev/null
gzip -9n "$OUT"/generated/man/*.8
# shellcheck disable=SC2086 # TARGET_ARG is empty or whole words
cargo deb --no-build $TARGET_ARG
