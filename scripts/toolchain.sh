# Sourced by tests/run.sh and .ci/run before any cargo command: makes sure the toolchain
# rust-toolchain.toml pins is the one cargo runs. Nothing can be downloaded on this machine
# kind, so when rustup lacks the pinned name but its `stable` is that very version, the name is
# linked to `stable` (as the machine's own set-up does); any other version is an error.
pinned_toolchain() {
    local want have home host
    want=$(sed -n 's/^channel = "\(.*\)"$/\1/p' rust-toolchain.toml)
    [[ -n $want ]] || { echo "toolchain.sh: no channel in rust-toolchain.toml" >&2; return 1; }
    if command -v rustup >/dev/null 2>&1 && ! rustup toolchain list | grep -q "^$want-"; then
        have=$(rustc +stable --version | awk '{print $2}')
        if [[ $have != "$want" ]]; then
            echo "toolchain.sh: rust-toolchain.toml pins $want, rustup has no such toolchain and its stable is $have" >&2
            return 1
        fi
        home=${RUSTUP_HOME:-$HOME/.rustup}
        host=$(rustc +stable -vV | sed -n 's/^host: //p')
        ln -s "stable-$host" "$home/toolchains/$want-$host"
        echo "toolchain.sh: linked toolchain $want to stable ($have)"
    fi
    have=$(rustc --version | awk '{print $2}')
    if [[ $have != "$want" ]]; then
        echo "toolchain.sh: cargo here runs rustc $have, rust-toolchain.toml pins $want" >&2
        return 1
    fi
    echo "rustc $have (pinned by rust-toolchain.toml)"
}
