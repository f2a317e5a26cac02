#!/usr/bin/env bash
# Builds the container image the integration tests start for each login,
# entirely offline (no registry is ever contacted):
#
#   FROM scratch
#   + busybox (Debian busybox-static), applets symlinked into /bin
#     (the same layout as `busybox --install -s /bin`)
#   + /usr/lib/openssh/sftp-server (openssh-sftp-server), /usr/bin/scp and
#     /usr/bin/ssh-add (openssh-client) and /usr/bin/socat (socat; unix-socket
#     and TCP servers/clients for the forwarding tests) and /usr/bin/stty (GNU
#     coreutils, for terminal sizes busybox will not print), with every shared
#     library ldd lists for them and the dynamic loader, at their host paths
#   + /etc/passwd, /etc/group (root, nobody), /etc/nsswitch.conf, /tmp (1777),
#     /root
#
# The image is tagged containerssh-test:<hash of the inputs> (this script, the
# Debian package versions and the bytes of every copied file) and
# containerssh-test:latest. When the hashed tag already exists nothing is built.
# The full image reference is printed as the LAST line of stdout; everything
# else goes to stderr.
#
# Safe to run concurrently: the whole script runs under an flock on
# ${CONTAINERSSH_TEST_IMAGE_LOCK:-/tmp/containerssh-test-image.lock}.
#
# Needs: docker (an engine that answers), dpkg-query, sha256sum and the Debian
# packages busybox-static, openssh-sftp-server, openssh-client, socat
# (`bash tests/run.sh` installs them when run as root).
set -euo pipefail

REPO=containerssh-test
PACKAGES=(busybox-static openssh-sftp-server openssh-client socat)
# GNU stty (coreutils) as /usr/bin/stty, ahead of busybox's on PATH: busybox's `stty size`
# refuses a 0x0 terminal that GNU's reports as "0 0", as on the hosts sshd runs on.
BINARIES=(/usr/lib/openssh/sftp-server /usr/bin/scp /usr/bin/ssh-add /usr/bin/socat /usr/bin/stty)
LOCK=${CONTAINERSSH_TEST_IMAGE_LOCK:-/tmp/containerssh-test-image.lock}

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# --- prerequisites, checked loudly -------------------------------------------
command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed"
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script needs a Debian-based host"
command -v flock >/dev/null 2>&1 || die "flock (util-linux) not found"
missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    die "missing Debian package(s): ${missing[*]} — install them with
    apt-get update && apt-get install -y --no-install-recommends ${missing[*]}
  (or run 'bash tests/run.sh' as root, which does it for you)"
fi
[[ -x /bin/busybox ]] || die "/bin/busybox missing although busybox-static is installed"
for b in "${BINARIES[@]}"; do
    [[ -x $b ]] || die "$b missing although its package is installed"
done
docker info >/dev/null 2>&1 || die "the Docker engine does not answer ('docker info' failed)"

# --- one builder at a time ----------------------------------------------------
exec 9>>"$LOCK"
if ! flock -w 600 9; then
    die "could not take the lock $LOCK within 600 s"
fi

# --- the file set: busybox + binaries + their libraries + the loader ----------
# Prints the absolute paths ldd names for a binary (libraries and the loader).
ldd_paths() {
    # Lines look like:  libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
    #                   /lib64/ld-linux-x86-64.so.2 (0x...)
    #                   linux-vdso.so.1 (0x...)          <- no file, skipped
    local line
    ldd "$1" | while IFS= read -r line; do
        line=${line#"${line%%[![:space:]]*}"}
        if [[ $line == *"=> /"* ]]; then
            line=${line#*=> }
            printf '%s\n' "${line%% (*}"
        elif [[ $line == /* ]]; then
            printf '%s\n' "${line%% (*}"
        fi
    done
}

FILES=(/bin/busybox "${BINARIES[@]}")
for b in "${BINARIES[@]}"; do
    if ldd "$b" | grep -q 'not found'; then
        die "ldd: unresolved libraries for $b: $(ldd "$b" | grep 'not found')"
    fi
    mapfile -t libs < <(ldd_paths "$b")
    ((${#libs[@]})) || die "ldd listed no library for $b (is it static? unexpected)"
    FILES+=("${libs[@]}")
done
mapfile -t FILES < <(printf '%s\n' "${FILES[@]}" | sort -u)

# --- the tag: hash of everything that goes in ------------------------------------
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
owners=$(for f in "${FILES[@]}"; do dpkg-query -S "$f" 2>/dev/null | cut -d: -f1 || true; done)
mapfile -t VERSION_PKGS < <(printf '%s\n' "${PACKAGES[@]}" "$owners" | sort -u)
inputs=$(
    echo "script:"; sha256sum <"$SCRIPT_PATH"
    echo "packages:"; dpkg-query -W "${VERSION_PKGS[@]}"
    echo "files:"; for f in "${FILES[@]}"; do printf '%s ' "$f"; sha256sum <"$(readlink -f "$f")"; done
)
TAG=$(printf '%s\n' "$inputs" | sha256sum | cut -c1-12)
REF="$REPO:$TAG"

if docker image inspect "$REF" >/dev/null 2>&1; then
    log "reusing $REF"
    docker tag "$REF" "$REPO:latest"
    printf '%s\n' "$REF"
    exit 0
fi

# --- assemble the context -------------------------------------------------------
CTX=$(mktemp -d /tmp/containerssh-test-image.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
ROOT="$CTX/rootfs"
mkdir -p "$ROOT"

# Copies a host file to the same path in the image. A symlink is recreated as a
# symlink (same link text) and its target copied too, so e.g.
# /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
# stays a link to a real file. Parent directories are made as real
# directories (the host's /lib -> usr/lib merge is not reproduced; the paths
# ldd printed are what the loader looks up).
copy_path() {
    local src=$1 dst="$ROOT$1"
    [[ -e $dst || -L $dst ]] && return 0
    mkdir -p "$(dirname "$dst")"
    if [[ -L $src ]]; then
        local link target
        link=$(readlink "$src")
        ln -s "$link" "$dst"
        if [[ $link == /* ]]; then target=$link; else target="$(dirname "$src")/$link"; fi
        copy_path "$(realpath -s "$target")"
    else
        cp -p "$src" "$dst"
    fi
}
for f in "${FILES[@]}"; do copy_path "$f"; done

# busybox --install -s /bin, done on the host: one relative symlink per applet.
for applet in $(/bin/busybox --list); do
    [[ -e $ROOT/bin/$applet || -L $ROOT/bin/$applet ]] || ln -s busybox "$ROOT/bin/$applet"
done
[[ -L $ROOT/bin/sh ]] || die "busybox has no sh applet?"

mkdir -p "$ROOT/etc" "$ROOT/tmp" "$ROOT/root" "$ROOT/usr/bin" "$ROOT/usr/sbin" "$ROOT/sbin"
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
cat >"$ROOT/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
shadow: files
hosts: files dns
EOF
# Common absolute paths scripts use.
ln -s /bin/env "$ROOT/usr/bin/env"

cat >"$CTX/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL containerssh_test_image="1" containerssh_test_image_inputs="$TAG"
CMD ["/bin/sh"]
EOF

log "building $REF"
start=$(date +%s)
# The legacy builder works on every engine (Docker 20.10 without BuildKit too),
# and needs nothing from a registry for FROM scratch.
DOCKER_BUILDKIT=0 docker build --no-cache --rm --force-rm \
    -t "$REF" -t "$REPO:latest" "$CTX" >&2 ||
    die "docker build failed"

# --- smoke-check what was built ---------------------------------------------------
docker run --rm --network none "$REF" /bin/sh -c '
    set -e
    echo hello | cat >/dev/null
    for c in sh cat stty sleep sha256sum head dd env; do command -v "$c" >/dev/null; done
    test -x /usr/lib/openssh/sftp-server
    test -x /usr/bin/scp
    test -x /usr/bin/ssh-add
    test -x /usr/bin/socat
' >&2 || die "the built image $REF fails its smoke check"
# sftp-server -h prints usage and exits non-zero; it must at least load and run.
out=$(docker run --rm --network none "$REF" /usr/lib/openssh/sftp-server -h 2>&1 || true)
[[ $out == *usage* ]] || die "sftp-server does not run in $REF: $out"
out=$(docker run --rm --network none "$REF" /usr/bin/scp 2>&1 || true)
[[ $out == *usage* ]] || die "scp does not run in $REF: $out"
# ssh-add connects to the agent before it parses options: without one it says so
# and exits non-zero (which proves it loads and runs). socat -V prints its version.
out=$(docker run --rm --network none "$REF" /usr/bin/ssh-add -l 2>&1 || true)
[[ $out == *"authentication agent"* ]] || die "ssh-add does not run in $REF: $out"
out=$(docker run --rm --network none "$REF" /usr/bin/socat -V 2>&1 || true)
[[ $out == *"socat version"* ]] || die "socat does not run in $REF: $out"

log "built $REF in $(($(date +%s) - start)) s"
printf '%s\n' "$REF"
