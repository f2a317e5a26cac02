#!/usr/bin/env bash
# Benchmark: containerssh vs OpenSSH sshd (plain and ForceCommand docker run) vs bare docker run.
# On demand only, never in CI. Needs root, a running Docker engine, Debian (apt) for
# openssh-server. Loopback only; every loop and wait is bounded. See bench/README.md.
#
#   bash bench/run.sh                      # everything, default sizes (~7-10 min on 2 cores + builds)
#   BENCH_N=5 BENCH_PHASES=latency bash bench/run.sh
#
# Environment (all optional):
#   BENCH_N=20               latency rounds (each round runs every variant once, interleaved)
#   BENCH_TP_N=3             throughput rounds
#   BENCH_TP_BYTES=1073741824  bytes per throughput transfer
#   BENCH_TP_GEN="head dd"   what writes them in the container, each in turn: head (busybox `head -c`), dd (bs=1M)
#   BENCH_SESSIONS=20        idle sessions held for the memory measurement
#   BENCH_PARALLEL="20 200"  parallel-login burst sizes
#   BENCH_PARALLEL_FC=1      also burst the sshd ForceCommand path
#   BENCH_HTTP_TIMEOUT=60s   docker.timeouts.http for our servers (default: the server default, 15s)
#   BENCH_BREAKDOWN_N=5      rounds of the debug-log latency breakdown
#   BENCH_PHASES=binary,latency,breakdown,throughput,memory,parallel,kube
#   BENCH_PARALLEL_POOL=1    also burst the largest parallel size against a pool that large
#   BENCH_KUBE_N=10          rounds of the Kubernetes phase (fake API server; cold and pool of 2)
#   BENCH_POOL=2             warm-pool size of the extra pooled variant in the latency phase (0: none)
#   BENCH_AUDIT=1            also time recorded sessions (audit binary and asciinema) in the throughput phase
#   BENCH_SKIP_BUILD=1       use the binaries already in target/ (no cargo build)
#   BENCH_BIN=PATH           benchmark this server binary instead of target/release/containerssh
#   BENCH_NO_STATIC=1        skip the static build
#   BENCH_USER=csshbench     throw-away system user created for the sshd side, removed at exit
#   BENCH_KEEP=1             keep the temp dir (configs, server logs, docker events)
#   BENCH_OUT=FILE           where the printed report is also written
#                            (default /tmp/containerssh-bench-<run>.txt)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
cd "$ROOT"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: it installs openssh-server if missing, runs a private sshd and creates a temporary user"
for c in docker ssh ssh-keygen python3 cargo useradd userdel usermod getent ldd; do
    command -v "$c" >/dev/null 2>&1 || die "$c not found"
done
python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "python3 >= 3.9 needed"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer ('docker info' failed)"

# --- OpenSSH's server, installed without starting the system service ---------------------
SSHD=${BENCH_SSHD:-/usr/sbin/sshd}
if [[ ! -x $SSHD ]]; then
    log "installing openssh-server (apt)"
    # Without a policy-rc.d, installing the package would start the system sshd on port 22;
    # a temporary one (exit 101 = "not allowed") keeps the system service stopped.
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server; } >&2 || rc=$?
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install openssh-server failed"
fi
# sshd refuses to start without its privilege-separation directory (normally made by systemd).
[[ -d /run/sshd ]] || { mkdir -p /run/sshd && chmod 0755 /run/sshd; }

# --- builds ----------------------------------------------------------------------------
BIN=${BENCH_BIN:-$ROOT/target/release/containerssh}
STATIC_TARGET_DIR=$ROOT/target/static
STATIC_BIN=$STATIC_TARGET_DIR/x86_64-unknown-linux-gnu/release/containerssh
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    if [[ -z ${BENCH_BIN:-} ]]; then
        log "cargo build --release"
        cargo build --release >&2 || die "release build failed"
    fi
    if [[ ${BENCH_NO_STATIC:-0} != 1 ]]; then
        log "static build: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu (CARGO_TARGET_DIR=target/static)"
        CARGO_TARGET_DIR=$STATIC_TARGET_DIR RUSTFLAGS='-C target-feature=+crt-static' \
            cargo build --release --target x86_64-unknown-linux-gnu >&2 ||
            log "WARNING: static build failed; its size will be reported as 'not built'"
    fi
fi
[[ -x $BIN ]] || die "$BIN missing (run without BENCH_SKIP_BUILD=1)"
AGENT_BIN=$STATIC_TARGET_DIR/x86_64-unknown-linux-gnu/release/containerssh-agent
[[ ${BENCH_NO_STATIC:-0} == 1 ]] && STATIC_BIN= && AGENT_BIN=

# --- the offline test image ---------------------------------------------------------------
IMAGE=$(bash tests/support/image/build.sh | tail -1)
[[ -n $IMAGE ]] || die "tests/support/image/build.sh printed no image reference"
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE not found after build.sh"

# --- run ---------------------------------------------------------------------------------
RUN=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
OUT=${BENCH_OUT:-/tmp/containerssh-bench-$RUN.txt}
PIDFILE=$(mktemp "/tmp/containerssh-bench-$RUN.pids.XXXXXX")
USER_NAME=${BENCH_USER:-csshbench}

# Back-stop for when bench.py itself is killed hard: its processes (by PID, only if the
# command line still names this run's temp dir or is a client of this run), its
# containers (by label), its user (by GECOS marker).
# shellcheck disable=SC2317  # invoked from the EXIT trap
backstop() {
    local pid
    while read -r pid; do
        [[ -n $pid && -r /proc/$pid/cmdline ]] || continue
        if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -e "containerssh-bench-$RUN" -e "containerssh_bench=$RUN"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done <"$PIDFILE" 2>/dev/null || true
    rm -f "$PIDFILE"
    local ids
    ids=$(docker ps -aq --filter "label=containerssh_bench=$RUN" 2>/dev/null || true)
    if [[ -n $ids ]]; then
        log "removing leftover containers of run $RUN"
        # shellcheck disable=SC2086
        docker rm -f -v $ids >/dev/null 2>&1 || true
    fi
    if [[ $(getent passwd "$USER_NAME" | cut -d: -f5) == "containerssh bench $RUN" ]]; then
        userdel "$USER_NAME" 2>/dev/null || true
    fi
}
trap backstop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 200 parallel clients, each with a few descriptors, plus the servers' side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log "run $RUN; image $IMAGE; report also in $OUT"
export BENCH_RUN=$RUN BENCH_IMAGE=$IMAGE BENCH_BIN=$BIN BENCH_STATIC_BIN=$STATIC_BIN BENCH_AGENT_BIN=$AGENT_BIN \
    BENCH_SSHD=$SSHD BENCH_PIDFILE=$PIDFILE BENCH_USER=$USER_NAME
{
    echo "command: ${0} (cwd $ROOT) $(env | grep -E '^BENCH_(N|TP_N|TP_BYTES|TP_GEN|SESSIONS|PARALLEL|PARALLEL_FC|PARALLEL_POOL|POOL|KUBE_N|HTTP_TIMEOUT|BREAKDOWN_N|PHASES)=' | tr '\n' ' ')"
    echo "host: $(uname -r), $(nproc) CPUs, docker $(docker version --format '{{.Server.Version}}' 2>/dev/null), $($SSHD -V 2>&1 | head -1 || true), git $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '+dirty')"
} | tee "$OUT"
set +e
python3 "$HERE/bench.py" 2>&1 | tee -a "$OUT"
rc=${PIPESTATUS[0]}
set -e
log "report: $OUT"
exit "$rc"
