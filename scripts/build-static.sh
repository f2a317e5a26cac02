#!/usr/bin/env bash
# Builds the two binaries as they ship: static-pie ELF executables (glibc linked
# statically with `-C target-feature=+crt-static`), stripped (the profile's
# `strip = true`):
#
#   containerssh        the server
#   containerssh-agent  the helper the server copies into every container
#
# Usage:  bash scripts/build-static.sh [--profile NAME]
#
#   --profile NAME   the Cargo profile (default: release: fat LTO, one codegen
#                    unit, stripped; what ships and what tests/run.sh tests)
#
# The target is the host's (x86_64-unknown-linux-gnu or aarch64-unknown-linux-gnu):
# `--target` must be given for `+crt-static` to apply to the binaries only and not
# to build scripts and proc macros. CARGO_TARGET_DIR defaults to target/static,
# the directory tests/run.sh builds the static agent in, so the two share their
# dependencies.
#
# Prints, for each binary: its path, its size (bytes and MiB) and what `file`
# says about it. Fails when `file` does not say "static-pie linked" (file 5.44,
# Debian 12, prints "ELF 64-bit LSB pie executable, x86-64, version 1 (SYSV),
# static-pie linked, for GNU/Linux 3.2.0, BuildID[sha1]=..., stripped"), or when
# the agent is bigger than the 32 MiB the server accepts. The last two lines of
# stdout are the two paths (server, then agent); everything else goes to stderr.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'build-static.sh: %s\n' "$*" >&2; }
die() { printf 'build-static.sh: ERROR: %s\n' "$*" >&2; exit 1; }

PROFILE=release
while (($#)); do
    case $1 in
        --profile) [[ $# -ge 2 && -n $2 ]] || die "--profile needs a value"; PROFILE=$2; shift 2 ;;
        --profile=*) PROFILE=${1#--profile=}; [[ -n $PROFILE ]] || die "--profile needs a value"; shift ;;
        -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (usage: bash scripts/build-static.sh [--profile NAME])" ;;
    esac
done

command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH"
command -v file >/dev/null 2>&1 || die "'file' not found (Debian package: file)"

case $(uname -m) in
    x86_64) TARGET=x86_64-unknown-linux-gnu ;;
    aarch64 | arm64) TARGET=aarch64-unknown-linux-gnu ;;
    *) die "unsupported machine $(uname -m): x86_64 and aarch64 only" ;;
esac

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/static}
# Cargo names the output directory after the profile, except `dev` → debug.
case $PROFILE in
    dev) OUT_SUBDIR=debug ;;
    *) OUT_SUBDIR=$PROFILE ;;
esac
OUT="$CARGO_TARGET_DIR/$TARGET/$OUT_SUBDIR"

log "cargo build --profile $PROFILE --target $TARGET (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
start=$(date +%s)
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --profile "$PROFILE" --target "$TARGET" \
    --bin containerssh --bin containerssh-agent >&2 ||
    die "cargo build failed"
log "built in $(($(date +%s) - start)) s"

MAX_AGENT=$((32 * 1024 * 1024))
paths=()
for bin in containerssh containerssh-agent; do
    path=$(realpath "$OUT/$bin")
    [[ -x $path ]] || die "$path missing after the build"
    size=$(stat -c %s "$path")
    what=$(file -b "$path")
    printf '%s\n  size: %s bytes (%s MiB)\n  file: %s\n' "$path" "$size" \
        "$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')" "$what" >&2
    [[ $what == *"static-pie linked"* ]] ||
        die "$path is not a static-pie executable; file says: $what"
    if [[ $bin == containerssh-agent ]] && ((size > MAX_AGENT)); then
        die "$path is $size bytes: over the 32 MiB the server accepts for the agent"
    fi
    paths+=("$path")
done
printf '%s\n' "${paths[@]}"
