#!/usr/bin/env bash
# Builds the server image FROM scratch (deploy/docker/Dockerfile.scratch), entirely
# offline: no registry is ever contacted.
#
#   bash deploy/docker/build-scratch.sh [--profile NAME]
#
# The binaries are built by scripts/build-static.sh (which gets the arguments),
# unless both CONTAINERSSH_STATIC_SERVER and CONTAINERSSH_STATIC_AGENT name
# prebuilt static binaries; then those are used as they are.
#
# The image is tagged containerssh:scratch-<hash of the inputs> (this script, the
# Dockerfile, the default config, /etc/passwd and /etc/group, the bytes of both
# binaries) and containerssh:<crate version>-scratch. When the hashed tag already
# exists nothing is built. The hashed reference is printed as the LAST line of
# stdout; everything else goes to stderr.
#
# Safe to run concurrently: the image build runs under an flock on
# ${CONTAINERSSH_SERVER_IMAGE_LOCK:-/tmp/containerssh-server-image.lock}.
#
# Needs: docker (an engine that answers), sha256sum, flock, file; cargo unless the
# binaries are given.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

REPO=containerssh
LOCK=${CONTAINERSSH_SERVER_IMAGE_LOCK:-/tmp/containerssh-server-image.lock}

log() { printf 'build-scratch.sh: %s\n' "$*" >&2; }
die() { printf 'build-scratch.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# --- prerequisites, checked loudly -------------------------------------------
command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed"
command -v flock >/dev/null 2>&1 || die "flock (util-linux) not found"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum (coreutils) not found"
command -v file >/dev/null 2>&1 || die "'file' not found (Debian package: file)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer ('docker info' failed)"

VERSION=$(awk -F'"' '/^\[/ { in_pkg = ($0 == "[package]") } in_pkg && /^version *=/ { print $2; exit }' Cargo.toml)
[[ -n $VERSION ]] || die "no [package] version in Cargo.toml"

# --- the binaries ---------------------------------------------------------------
SERVER=${CONTAINERSSH_STATIC_SERVER:-}
AGENT=${CONTAINERSSH_STATIC_AGENT:-}
if [[ -n $SERVER || -n $AGENT ]]; then
    [[ -n $SERVER && -n $AGENT ]] ||
        die "set both CONTAINERSSH_STATIC_SERVER and CONTAINERSSH_STATIC_AGENT, or neither"
    (($# == 0)) || die "arguments ($*) are for scripts/build-static.sh, which is not run when the binaries are given"
    log "using the given binaries: $SERVER, $AGENT"
else
    mapfile -t built < <(bash scripts/build-static.sh "$@" | tail -n 2)
    ((${#built[@]} == 2)) || die "scripts/build-static.sh did not print the two binaries' paths"
    SERVER=${built[0]}
    AGENT=${built[1]}
fi
for b in "$SERVER" "$AGENT"; do
    [[ -f $b && -x $b ]] || die "$b: not an executable file"
    what=$(file -b "$b")
    [[ $what == *"static-pie linked"* ]] || die "$b is not a static-pie executable; file says: $what"
done

# --- the context ------------------------------------------------------------------
CTX=$(mktemp -d /tmp/containerssh-server-image.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
cp deploy/docker/Dockerfile.scratch "$CTX/Dockerfile"
cp deploy/docker/config.yaml "$CTX/config.yaml"
cp "$SERVER" "$CTX/containerssh"
cp "$AGENT" "$CTX/containerssh-agent"
chmod 0755 "$CTX/containerssh" "$CTX/containerssh-agent"
chmod 0644 "$CTX/config.yaml"
cat >"$CTX/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$CTX/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
chmod 0644 "$CTX/passwd" "$CTX/group"
mkdir -m 0700 "$CTX/state"

# --- the tag: hash of everything that goes in -----------------------------------------
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
TAG=$(
    cd "$CTX"
    {
        printf 'script '; sha256sum <"$SCRIPT_PATH"
        sha256sum Dockerfile config.yaml passwd group containerssh containerssh-agent
    } | sha256sum | cut -c1-12
)
REF="$REPO:scratch-$TAG"
VERSION_REF="$REPO:$VERSION-scratch"

exec 9>>"$LOCK"
flock -w 600 9 || die "could not take the lock $LOCK within 600 s"

if docker image inspect "$REF" >/dev/null 2>&1; then
    log "reusing $REF"
    docker tag "$REF" "$VERSION_REF"
    printf '%s\n' "$REF"
    exit 0
fi

log "building $REF"
start=$(date +%s)
# The legacy builder works on every engine and needs nothing from a registry for
# FROM scratch (as tests/support/image/build.sh).
DOCKER_BUILDKIT=0 docker build --no-cache --rm --force-rm \
    --label "containerssh_server_image_inputs=$TAG" \
    -t "$REF" -t "$VERSION_REF" "$CTX" >&2 ||
    die "docker build failed"

# --- smoke-check what was built ------------------------------------------------------
# The entrypoint loads the baked-in config and prints it: the binary runs in the image
# (as 65532) and the config is valid.
out=$(docker run --rm --network none "$REF" --dump-config 2>&1) ||
    die "the built image $REF fails its smoke check (--dump-config): $out"
[[ $out == *"stateDirectory: /var/lib/containerssh"* ]] ||
    die "the built image $REF printed an unexpected config: $out"

log "built $REF ($VERSION_REF) in $(($(date +%s) - start)) s"
printf '%s\n' "$REF"
