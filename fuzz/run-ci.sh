#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 20) on a throw-away copy of its committed seed
# corpus, so CI never grows the repository's corpus. Fails if any target crashes, and prints
# each crashing input (base64) so it can be reproduced from the CI log alone:
#   base64 -d > crash && cargo +nightly fuzz run <target> crash
#
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_TARGETS   space-separated subset of targets (default: all of `cargo fuzz list`)
#   FUZZ_TOOLCHAIN toolchain with -Z flags (default nightly)
#   FUZZ_ARTIFACTS where crash inputs are kept (default: a temp dir, printed at the end)
# A libFuzzer dictionary in dicts/<target>.dict is used when present.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
seconds=${FUZZ_SECONDS:-20}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "fuzz/run-ci.sh: FUZZ_SECONDS must be a positive integer" >&2; exit 2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "fuzz/run-ci.sh: the $toolchain toolchain is missing (rustup toolchain install $toolchain)" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-ci.XXXXXX")
artifacts=${FUZZ_ARTIFACTS:-$work/artifacts}
mkdir -p "$artifacts"
# The corpus copies go; crash inputs stay (empty directories are removed).
cleanup() { rm -rf "$work/corpus"; find "$work" -depth -type d -empty -delete 2>/dev/null || true; }
trap cleanup EXIT

targets=${FUZZ_TARGETS:-$(cargo "+$toolchain" fuzz list)}
# One build for all targets (release, debug assertions, AddressSanitizer: serde_yaml's
# libyaml port is unsafe code); `run` below then finds them up to date.
cargo "+$toolchain" fuzz build

failed=()
for target in $targets; do
    seeds=corpus/$target
    [[ -d $seeds ]] || { echo "fuzz/run-ci.sh: no seed corpus $seeds" >&2; exit 2; }
    mkdir -p "$work/corpus/$target" "$artifacts/$target"
    cp -R "$seeds/." "$work/corpus/$target/"
    extra=()
    [[ -f dicts/$target.dict ]] && extra+=("-dict=$PWD/dicts/$target.dict")
    echo "---------- $target: ${seconds}s on $(find "$seeds" -type f | wc -l) seeds ----------"
    if ! cargo "+$toolchain" fuzz run "$target" "$work/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/$target/" "${extra[@]}" </dev/null; then
        failed+=("$target")
        for f in "$artifacts/$target"/*; do
            [[ -f $f ]] || continue
            echo "crashing input $f (base64):"
            base64 -w0 "$f"
            echo
        done
    fi
done

if ((${#failed[@]})); then
    echo "fuzz/run-ci.sh: FAILED targets: ${failed[*]}; inputs under $artifacts" >&2
    exit 1
fi
echo "fuzz/run-ci.sh: all targets ran ${seconds}s without a crash"
