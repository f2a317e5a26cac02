#!/usr/bin/env bash
# cargo-deny without network: advisories come from the RustSec snapshot that CI keeps beside the
# clone (<repo>/../shared/rustsec/advisory-db.tar.gz, or ADVISORY_DB_TARBALL). The committed
# deny.toml stays as it is (networked machines run plain `cargo deny check`); this script points
# a generated copy of it at the extracted snapshot.
set -euo pipefail

root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
cd "$root"
die() { printf '.ci/deny.sh: ERROR: %s\n' "$*" >&2; exit 1; }

tarball=${ADVISORY_DB_TARBALL:-$root/../shared/rustsec/advisory-db.tar.gz}
[[ -f $tarball ]] || die "advisory database snapshot not found at $tarball (set ADVISORY_DB_TARBALL)"

if ! cargo deny --version >/dev/null 2>&1; then
    echo "installing cargo-deny"
    cargo install cargo-deny --locked
fi
cargo deny --version

work=$(mktemp -d "${TMPDIR:-/tmp}/deny-ci.XXXXXX")
trap 'rm -rf "$work"' EXIT

# cargo-deny looks for the database in a directory named after its URL
# (https://github.com/rustsec/advisory-db → advisory-db-3157b0e258782691).
tar xzf "$tarball" -C "$work"
[[ -d $work/advdb-shallow ]] || die "$tarball does not contain advdb-shallow/"
mv "$work/advdb-shallow" "$work/advisory-db-3157b0e258782691"
if git -C "$work/advisory-db-3157b0e258782691" log -1 --format='%h %cs' >/dev/null 2>&1; then
    echo "advisory database snapshot: $(git -C "$work/advisory-db-3157b0e258782691" log -1 --format='commit %h, %cs')"
fi

# The committed policy with db-path set; every other key is untouched.
awk -v db="$work" '
    { print }
    /^\[advisories\]/ { printf "db-path = \"%s\"\n", db }
' deny.toml >"$work/deny.toml"
grep -q '^db-path = ' "$work/deny.toml" || die "deny.toml has no [advisories] table"

# --offline: no database fetch; yanked status comes from cargo's local index cache, which the
# build's `cargo fetch` fills.
cargo fetch --locked
cargo deny --offline --locked --config "$work/deny.toml" check --show-stats

# Vendored crates (vendor/README.md) are path dependencies, which cargo-deny does not check for
# advisories: check the crates.io release each is based on instead, in a throw-away manifest that
# depends on exactly that version with the features Cargo.toml gives it.
for manifest in vendor/*/Cargo.toml; do
    name=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest" | head -n 1)
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$manifest" | head -n 1)
    dep=$(grep -m 1 -E "^$name = \{ version = " Cargo.toml) || die "Cargo.toml has no dependency line for vendored $name"
    dep=$(sed -E "s/version = \"[^\"]*\"/version = \"=$version\"/" <<<"$dep")
    dir=$work/upstream-$name
    mkdir -p "$dir/src"
    printf '[package]\nname = "upstream-%s-check"\nversion = "0.0.0"\nedition = "2021"\npublish = false\nlicense = "Apache-2.0"\n\n[dependencies]\n%s\n' \
        "$name" "$dep" >"$dir/Cargo.toml"
    : >"$dir/src/lib.rs"
    echo "advisories for the published $name $version (vendored with patches):"
    cargo generate-lockfile --quiet --manifest-path "$dir/Cargo.toml"
    cargo fetch --quiet --manifest-path "$dir/Cargo.toml"
    cargo deny --offline --manifest-path "$dir/Cargo.toml" --config "$work/deny.toml" check advisories
done
