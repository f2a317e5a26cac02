#!/usr/bin/env bash
# The project's test command:  bash tests/run.sh [extra args for the test binaries]
#
#  1. makes sure the Debian packages the tests use are installed (installs them
#     with apt-get when run as root; otherwise fails naming them),
#     and the PyPI packages (ssh-audit, paramiko; pinned) with pip,
#  2. checks that the Docker engine answers,
#  3. builds (or reuses) the offline test image and exports
#     CONTAINERSSH_TEST_IMAGE,
#  4. builds the static server and agent and the FROM scratch server image
#     (exports CONTAINERSSH_TEST_AGENT, CONTAINERSSH_TEST_STATIC_SERVER and
#     CONTAINERSSH_TEST_SERVER_IMAGE), cargo build --bins, cargo test --all-targets.
#
# Extra arguments go to the test binaries, e.g. `bash tests/run.sh exec_echo`
# or `bash tests/run.sh --test-threads 1`. TEST_THREADS overrides the number of
# tests each test binary runs at once (default: cargo's, one per core).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==> %s\n' "$*"; }
die() { printf 'tests/run.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# --- 0. the pinned toolchain -------------------------------------------------------
section "rust toolchain"
# shellcheck source=scripts/toolchain.sh
source scripts/toolchain.sh
pinned_toolchain || die "the toolchain rust-toolchain.toml pins is not available"

# --- 1. packages ---------------------------------------------------------------
# openssh-server is only needed by the benchmarks (a reference sshd); it is not
# installed here.
PACKAGES=(openssh-client busybox-static openssh-sftp-server socat tmux openssl curl file haproxy prometheus)
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
for c in ssh scp sftp ssh-keygen ssh-keyscan tmux openssl sha256sum curl file haproxy prometheus promtool; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' not found on PATH even though its package is installed"
done

# --- 1b. Python peers (PyPI) ------------------------------------------------------
# Pinned so their verdicts and behaviour do not drift: the stock SSH auditor (tests/audit.rs
# runs `python3 -m ssh_audit`) and a third-party client library (paramiko: raw auth sequences
# from another implementation), the asciicast player, a CBOR decoder written by others
# (reads the binary audit format as ContainerSSH's tools do) and an S3 server (moto's).
PYPI_PACKAGES=(ssh-audit==3.9.0 paramiko==5.1.0 asciinema==2.4.0 cbor2==6.3.0 "moto[server]==5.2.1")
section "checking PyPI packages: ${PYPI_PACKAGES[*]}"
command -v python3 >/dev/null 2>&1 || die "python3 not found (the tests run ssh-audit and paramiko with it)"
for spec in "${PYPI_PACKAGES[@]}"; do
    name=${spec%%==*} want=${spec##*==}
    name=${name%%[*}
    have=$(python3 -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)
    if [[ $have != "$want" ]]; then
        echo "installing $spec (found: ${have:-none})"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            "$spec" </dev/null || die "pip install $spec failed"
    fi
done
python3 -m ssh_audit --help >/dev/null 2>&1 || die "python3 -m ssh_audit does not run"
python3 -c 'import paramiko' || die "python3 cannot import paramiko"
python3 -m asciinema --version >/dev/null 2>&1 || die "python3 -m asciinema does not run"
python3 -c 'import cbor2' || die "python3 cannot import cbor2"
python3 -c "import moto.server" || die "python3 cannot import moto.server (moto[server])"

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
# The static binaries (scripts/build-static.sh: +crt-static, static-pie, stripped,
# checked with file(1)) in the `static-test` profile — the release's linking without
# its optimisation and fat LTO — and the FROM scratch server image made of them
# (deploy/docker/build-scratch.sh, used by tests/image.rs). The test servers inject
# that static agent. The build runs in the background while the debug binaries and
# the test binaries compile, and is joined before any test runs.
section "static server, agent and server image (in the background)"
server_image_out=$(mktemp /tmp/containerssh-server-image.XXXXXX)
server_image_log=$(mktemp /tmp/containerssh-server-image-log.XXXXXX)
bash deploy/docker/build-scratch.sh --profile static-test >"$server_image_out" 2>"$server_image_log" </dev/null &
server_image_pid=$!
echo "started (pid $server_image_pid, log $server_image_log)"

section "cargo build --bins; cargo test --all-targets --no-run"
no_run_status=0
{ cargo build --bins && cargo test --all-targets --no-run; } || no_run_status=$?

section "static server, agent and server image"
server_image_status=0
wait "$server_image_pid" || server_image_status=$?
if ((server_image_status != 0)); then
    cat "$server_image_log" >&2
    die "deploy/docker/build-scratch.sh failed (exit $server_image_status)"
fi
((no_run_status == 0)) || die "building the debug binaries or the tests failed (exit $no_run_status)"
grep -E '^build-(static|scratch)\.sh: |^  (size|file): |^/' "$server_image_log" || true
CONTAINERSSH_TEST_SERVER_IMAGE=$(tail -n 1 "$server_image_out")
rm -f "$server_image_out" "$server_image_log"
[[ -n $CONTAINERSSH_TEST_SERVER_IMAGE ]] || die "deploy/docker/build-scratch.sh printed no image reference"
static_dir=$PWD/target/static/$(uname -m)-unknown-linux-gnu/static-test
export CONTAINERSSH_TEST_SERVER_IMAGE
export CONTAINERSSH_TEST_STATIC_SERVER=$static_dir/containerssh
export CONTAINERSSH_TEST_AGENT=$static_dir/containerssh-agent
echo "CONTAINERSSH_TEST_SERVER_IMAGE=$CONTAINERSSH_TEST_SERVER_IMAGE"
ls -l "$CONTAINERSSH_TEST_STATIC_SERVER" "$CONTAINERSSH_TEST_AGENT"

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
