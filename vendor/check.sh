#!/usr/bin/env bash
# Proves that each vendored crate is exactly its published crates.io release plus the patches
# in vendor/patches/<crate>/ (applied in name order): downloads the release, checks it against
# the checksum pinned below (the one crates.io's index publishes), applies the patches and
# compares the trees. Run by .ci/run; run it after changing a vendored crate.
#
#   bash vendor/check.sh            verify
#   bash vendor/check.sh --diff     also print the difference when the trees differ
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
die() { printf 'vendor/check.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# crate version sha256-of-the-.crate-file (crates.io index "cksum")
CRATES=(
    "russh 0.65.4 569d8c45e20c123af2fc5ecb4803fde0a98572449ba4c24ed97741d7b02fedf7"
)

show_diff=0
[[ ${1:-} == --diff ]] && show_diff=1

work=$(mktemp -d "${TMPDIR:-/tmp}/vendor-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

for entry in "${CRATES[@]}"; do
    read -r name version sum <<<"$entry"
    [[ -d $name ]] || die "vendor/$name is missing"
    grep -q "^version = \"$version\"$" "$name/Cargo.toml" || die "vendor/$name/Cargo.toml is not version $version"
    file=$work/$name-$version.crate
    curl -fsSL --retry 3 -o "$file" "https://static.crates.io/crates/$name/$name-$version.crate" ||
        die "cannot download $name $version from crates.io"
    echo "$sum  $file" | sha256sum -c --quiet - || die "$name $version: checksum mismatch"
    tar xzf "$file" -C "$work"
    shopt -s nullglob
    for p in "patches/$name"/*.patch; do
        patch -s -p1 -d "$work/$name-$version" <"$p" || die "$p does not apply to $name $version"
        echo "applied $p"
    done
    shopt -u nullglob
    if ! diff -r -q "$work/$name-$version" "$name" >/dev/null; then
        ((show_diff)) && diff -ruN "$work/$name-$version" "$name" || true
        die "vendor/$name differs from $name $version + vendor/patches/$name (run with --diff)"
    fi
    echo "vendor/$name = $name $version (crates.io, checksum ok) + its patches: ok"
done
