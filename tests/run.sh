#!/usr/bin/env bash
# The project's test command:  bash tests/run.sh [extra args for the test binaries]
#
#  1. makes sure the Debian packages the tests use are installed (installs them
#     with apt-get when run as root; otherwise fails naming them),
#  2. checks that the Docker engine answers,
#  3. builds (or reuses) the offline test image and exports
#     CONTAINERSSH_TEST_IMAGE,
#  4. cargo build --bins && cargo test --all-targets.
#
# Extra arguments go to the test binaries, e.g. `bash tests/run.sh exec_echo`
# or `bash tests/run.sh --test-threads 1`. TEST_THREADS overrides the number of
# tests each test binary runs at once (default: cargo's, one per core).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==> %s\n' "$*"; }
die() { printf 'tests/run.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. packages ---------------------------------------------------------------
# openssh-server is only needed by the benchmarks (a reference sshd); it is not
# installed here.
PACKAGES=(openssh-client busybox-static openssh-sftp-server socat tmux openssl curl)
section "checking Debian packages: ${PACKAGES[*]}"
command -v dpkg-query >/dev/null 2>&1 ||
    die "dpkg-query not found: the tests need a Debian-based host with: ${PACKAGES[*]}"
missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        die "missing Debian package(s): ${missing[*]}
  install them as root:  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
    fi
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null ||
        die "apt-get install ${missing[*]} failed"
fi
for c in ssh scp sftp ssh-keygen ssh-keyscan tmux openssl sha256sum curl; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' not found on PATH even though its package is installed"
done

# --- 2. the engine -------------------------------------------------------------
section "checking the Docker engine"
command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed (Debian package docker.io)"
if ! docker info >/dev/null 2>&1; then
    docker info >&2 || true
    die "the Docker engine does not answer ('docker info' failed): start dockerd (CI: .ci/run does it)"
fi
docker version --format 'client {{.Client.Version}}, engine {{.Server.Version}} (API {{.Server.APIVersion}})'

# --- 3. the test image ---------------------------------------------------------
section "building the test image"
image=$(bash tests/support/image/build.sh | tail -n 1)
[[ -n $image ]] || die "tests/support/image/build.sh printed no image reference"
export CONTAINERSSH_TEST_IMAGE=$image
echo "CONTAINERSSH_TEST_IMAGE=$CONTAINERSSH_TEST_IMAGE"

# --- 4. build and test ---------------------------------------------------------
section "cargo build --bins"
cargo build --bins

# The agent the test servers inject: static, as it ships (see README).
section "static agent"
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=target/static \
    cargo build --release --target x86_64-unknown-linux-gnu --bin containerssh-agent
export CONTAINERSSH_TEST_AGENT=$PWD/target/static/x86_64-unknown-linux-gnu/release/containerssh-agent
ls -l "$CONTAINERSSH_TEST_AGENT"

section "cargo test --all-targets"
test_args=()
if [[ -n ${TEST_THREADS:-} ]]; then
    test_args+=(--test-threads "$TEST_THREADS")
fi
status=0
# --no-fail-fast: a failing test binary does not hide the results of the others.
cargo test --all-targets --no-fail-fast -- "${test_args[@]}" "$@" || status=$?

if ((status != 0)); then
    echo "tests/run.sh: tests FAILED (exit $status)" >&2
fi
exit "$status"
