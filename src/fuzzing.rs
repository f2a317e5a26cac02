//! Entry points for the fuzz targets in `fuzz/`; each asserts the invariants of one parser.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use crate::config::duration::{parse_go_duration, GoDuration};
use crate::config::load::{parse_json, parse_yaml};
use crate::config::AppConfig;

/// The config loader must never panic; whatever it accepts (as YAML or as JSON) must validate
/// or fail cleanly, and must survive a write-out and re-read unchanged, so the hand-written
/// (de)serializers (durations, log levels, algorithm lists) agree with each other.
pub fn fuzz_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = [
        parse_yaml::<AppConfig>("fuzz", text),
        parse_json::<AppConfig>("fuzz", text),
    ];
    for cfg in parsed.into_iter().flatten() {
        assert_eq!(yaml_round_trip(&cfg), Ok(()));
        let _ = crate::backend::build::checked_settings("fuzz", cfg);
    }
}

/// Writes an accepted config out as YAML and reads it back: every step must succeed (the
/// error says which failed) and the config must come back unchanged.
fn yaml_round_trip(cfg: &AppConfig) -> Result<(), String> {
    let before = serde_json::to_value(cfg)
        .map_err(|e| format!("an accepted config does not serialize: {e}"))?;
    let yaml = serde_yaml::to_string(cfg)
        .map_err(|e| format!("an accepted config does not serialize to YAML: {e}"))?;
    let again: AppConfig = parse_yaml("fuzz-rewritten", &yaml)
        .map_err(|e| format!("re-reading our own YAML failed: {e}\n{yaml}"))?;
    let after = serde_json::to_value(&again)
        .map_err(|e| format!("a re-read config does not serialize: {e}"))?;
    assert_eq!(before, after, "YAML round trip changed the config:\n{yaml}");
    Ok(())
}

/// The Docker stream demultiplexer: bounded output, no panic.
pub fn fuzz_docker_demux(data: &[u8]) {
    crate::backend::docker::fuzz_demux(data);
}

/// Go durations: no panic (overflow included); what parses prints back as a string that
/// parses to the same value.
pub fn fuzz_go_duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(d) = parse_go_duration(text) else {
        return;
    };
    // GoDuration must serialize to a string (anything else fails the assertion as `None`).
    let printed = serde_json::to_value(GoDuration(d));
    let reparsed = match &printed {
        Ok(serde_json::Value::String(s)) => Some(parse_go_duration(s)),
        _ => None,
    };
    assert_eq!(
        reparsed,
        Some(Ok(d)),
        "{text:?} parsed to {d:?}, printed as {printed:?}"
    );
}

/// Exec command splitting: no panic; the words it returns, re-quoted, split back to themselves,
/// and a command always yields a non-empty argv.
pub fn fuzz_split_words(data: &[u8]) {
    let Ok(command) = std::str::from_utf8(data) else {
        return;
    };
    assert!(!crate::ssh::program::exec_argv(command).is_empty());
    let Some(words) = crate::ssh::program::split_words(command) else {
        return;
    };
    let requoted = words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        crate::ssh::program::split_words(&requoted).as_ref(),
        Some(&words),
        "{command:?} -> {words:?} -> {requoted:?}"
    );
}

/// The public key every `authorized_keys` seed uses, so that the matching paths (`from=`,
/// `expiry-time=`, granted options) are reached as well as the line parser.
const FUZZ_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAkwHXLD1vhnEB10FSkjyM1j6fAjv1CJJfK+nHZW14wJ";

/// `authorized_keys` lines (OpenSSH options: quoting, `from=` patterns and networks,
/// `expiry-time=`, `environment=`): no panic, whatever the file holds. The parser is private
/// to `auth`, so the input goes through the real file read, once per client address family.
pub fn fuzz_authorized_keys(data: &[u8]) {
    static SETUP: OnceLock<
        Result<
            (
                PathBuf,
                crate::auth::authorized_keys::AuthorizedKeys,
                russh::keys::PublicKey,
            ),
            String,
        >,
    > = OnceLock::new();
    let setup = SETUP.get_or_init(|| {
        // One directory per fuzzing process (libFuzzer's -fork/-jobs run several); a process
        // cannot clean up after itself (libFuzzer ends with exit()), so each start removes
        // the directories of processes that are gone.
        const PREFIX: &str = "containerssh-fuzz-";
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if pid.is_some_and(|p| !std::path::Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("create the fuzz temp dir {}: {e}", dir.display()))?;
        let template = dir
            .join("%u")
            .to_str()
            .ok_or_else(|| format!("the fuzz temp dir {} is not UTF-8", dir.display()))?
            .to_owned();
        let key = russh::keys::PublicKey::from_openssh(FUZZ_KEY)
            .map_err(|e| format!("FUZZ_KEY does not parse: {e}"))?;
        Ok((
            dir.join("fuzz"),
            crate::auth::authorized_keys::AuthorizedKeys::new(template),
            key,
        ))
    });
    // Without its file the harness tests nothing: a failed setup fails the run.
    assert_eq!(setup.as_ref().err(), None, "fuzz setup");
    let Ok((file, keys, key)) = setup else {
        return;
    };
    let written = std::fs::write(file, data);
    assert!(
        written.is_ok(),
        "write the fuzz authorized_keys file: {written:?}"
    );
    // 2026-01-01: expiry times on either side are in the seeds.
    let now = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    for ip in [
        IpAddr::from([192, 0, 2, 7]),
        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7]),
    ] {
        let _ = keys.find("fuzz", key, ip, now);
    }
}

/// The agent's argument parser: the input is an argument vector with NUL between arguments
/// (`argv[1..]`). No panic; a parsed `console` always has a program, and `signal`/`exit-info`
/// never target PID 0 or a negative PID (which would mean process groups to kill()).
pub fn fuzz_agent_args(data: &[u8]) {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    use crate::agent::cli::{parse, Command};

    let args: Vec<OsString> = data
        .split(|&b| b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    match parse(&args) {
        Ok(Command::Console(c)) => assert!(!c.argv.is_empty(), "console without a program"),
        Ok(Command::ExecChild { argv, .. }) => {
            assert!(!argv.is_empty(), "exec-child without a program")
        }
        Ok(Command::Signal { pid, .. } | Command::ExitInfo { pid }) => {
            assert!(pid > 0, "pid {pid}")
        }
        Ok(Command::WaitSignal { signals }) => assert!(!signals.is_empty()),
        Ok(_) | Err(_) => {}
    }
}

/// The agent's forwarding frames: decoding never panics and stops at the first error; every
/// frame it decodes encodes back to exactly the bytes it came from.
pub fn fuzz_agent_proto(data: &[u8]) {
    use crate::agent::proto::{decode, HEADER_LEN, MAX_PAYLOAD};

    let mut rest = data;
    while let Ok(Some((frame, used))) = decode(rest) {
        let consumed = rest.split_at_checked(used);
        assert!(
            (HEADER_LEN..=HEADER_LEN + MAX_PAYLOAD).contains(&used) && consumed.is_some(),
            "consumed {used} of {}",
            rest.len()
        );
        let Some((bytes, after)) = consumed else {
            return;
        };
        let mut again = Vec::new();
        frame.encode(&mut again);
        assert_eq!(again, bytes, "{frame:?} re-encodes differently");
        rest = after;
    }
}

/// The Kubernetes channel frames: the input is a sequence of messages, each a big-endian
/// 16-bit length and that many bytes. Decoding never panics, hands out exactly the payload,
/// and channel 3 is accumulated within its cap; a collected `Status` gives an exit code of at
/// most 255 or a failure.
pub fn fuzz_kube_frames(data: &[u8]) {
    use crate::backend::kubernetes::wire::{
        decode, exit_from_status, resize, ErrorChannel, ExecOutcome, Incoming, WireError,
        MAX_STATUS_BYTES,
    };

    if let [a, b, c, d, ..] = data {
        let (cols, rows) = (u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]));
        let msg = resize(cols, rows);
        // The channel byte, then JSON with the size.
        let size = msg
            .split_first()
            .and_then(|(_, json)| serde_json::from_slice::<serde_json::Value>(json).ok());
        let field = |name: &str| size.as_ref().and_then(|s| s.get(name)?.as_u64());
        assert_eq!(
            (field("Width"), field("Height")),
            (Some(u64::from(cols)), Some(u64::from(rows))),
            "resize wrote {msg:?}"
        );
    }
    let mut errors = ErrorChannel::new();
    let mut total = 0usize;
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (msg, after) = tail.split_at(len);
        rest = after;
        // The channel byte and the payload; no channel for an empty message.
        let (channel, payload) = match msg.split_first() {
            Some((&ch, payload)) => (Some(ch), payload),
            None => (None, msg),
        };
        match decode(msg) {
            Ok(Incoming::Empty) => {
                assert!(payload.is_empty() && channel.is_some_and(|ch| (1..=3).contains(&ch)))
            }
            Ok(Incoming::Stdout(p)) => {
                assert!(channel == Some(1) && p == payload && !p.is_empty())
            }
            Ok(Incoming::Stderr(p)) => {
                assert!(channel == Some(2) && p == payload && !p.is_empty())
            }
            Ok(Incoming::Error(p)) => {
                assert!(channel == Some(3) && p == payload && !p.is_empty());
                total += p.len();
                let pushed = errors.push(p);
                assert_eq!(pushed.is_ok(), total <= MAX_STATUS_BYTES, "{total} bytes");
            }
            Err(e) => {
                // Only these two errors, each for its own reason.
                let expected = match e {
                    WireError::EmptyMessage => msg.is_empty(),
                    WireError::UnexpectedChannel(ch) => {
                        channel == Some(ch) && !(1..=3).contains(&ch)
                    }
                    _ => false,
                };
                assert!(expected, "decode gave {e:?} for {msg:?}");
            }
        }
        assert!(errors.bytes().len() <= MAX_STATUS_BYTES);
    }
    match errors.status() {
        Ok(Some(status)) => match exit_from_status(&status) {
            ExecOutcome::Exited(code) => assert!(code <= 255, "exit code {code}"),
            ExecOutcome::Failed { reason, .. } => assert!(!reason.is_empty()),
        },
        Ok(None) => assert!(errors.bytes().iter().all(u8::is_ascii_whitespace)),
        Err(WireError::StatusTooLarge) => assert!(total > MAX_STATUS_BYTES),
        Err(_) => {}
    }
}

/// Certificate critical options and extensions: checking them never panics and keeps a
/// forced command verbatim.
pub fn fuzz_cert_options(data: &[u8]) {
    crate::auth::certificate::fuzz_cert_options(data);
}

/// PROXY protocol headers: the parser never panics, never claims more bytes than it was
/// given, gives the same header for exactly its own bytes, and calls every strict prefix of a
/// header incomplete (so a header split over reads is read whole, never misparsed).
pub fn fuzz_proxy_header(data: &[u8]) {
    use crate::front::proxy::{parse, V2_MAX_BYTES};
    match parse(data) {
        Ok(Some((header, n))) => {
            let own = data.get(..n);
            assert!(own.is_some() && n <= V2_MAX_BYTES);
            assert_eq!(own.map(parse), Some(Ok(Some((header, n)))));
            for cut in [0, 1, n / 2, n.saturating_sub(1)] {
                if cut < n {
                    assert_eq!(
                        data.get(..cut).map(parse),
                        Some(Ok(None)),
                        "prefix of {cut}"
                    );
                }
            }
        }
        Ok(None) => assert!(data.len() < V2_MAX_BYTES),
        Err(_) => {}
    }
}

/// Auth webhook answers: decoded, merged (names, paths, base64 files and sizes checked) and
/// applied to a login's metadata without a panic.
pub fn fuzz_auth_response(data: &[u8]) {
    crate::auth::webhook::fuzz_auth_response(data);
}

/// Kubernetes `Status` bodies and watch streams: the input is read as a `Status` (for exec
/// exit codes and REST errors) and as a watch body, cut into lines in chunks of the size the
/// first byte gives. No panic, lines within their limit, and the pod state of every decoded
/// pod agrees with its container's exit code.
pub fn fuzz_kube_status(data: &[u8]) {
    use crate::backend::kubernetes::wire::{
        decode_event, evaluate, exit_from_status, terminated_exit_code, ApiError, ExecOutcome,
        LineSplitter, PodState, Status, WatchEvent, MAX_ERROR_MESSAGE_CHARS, MAX_WATCH_LINE_BYTES,
    };

    if let Ok(status) = Status::from_json(data) {
        if let ExecOutcome::Exited(code) = exit_from_status(&status) {
            assert!(code <= 255, "exit code {code}");
        }
    }
    for http in [200, 404, 410, 500] {
        let e = ApiError::new(http, data);
        let shown = e.to_string();
        assert!(
            shown.chars().count() <= MAX_ERROR_MESSAGE_CHARS + 128,
            "{} chars",
            shown.len()
        );
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        let _ = (
            e.is_not_found(),
            e.is_conflict(),
            e.is_gone(),
            e.is_unauthorized(),
        );
    }

    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut splitter = LineSplitter::new();
    let mut lines = Vec::new();
    for piece in data.chunks(chunk) {
        match splitter.push(piece) {
            Ok(mut complete) => lines.append(&mut complete),
            Err(_) => return,
        }
        assert!(splitter.buffered() <= MAX_WATCH_LINE_BYTES);
    }
    if let Ok(Some(last)) = splitter.finish() {
        lines.push(last);
    }
    for line in lines {
        assert!(line.len() <= MAX_WATCH_LINE_BYTES && !line.contains(&b'\n'));
        let pod = match decode_event(&line) {
            Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod) | WatchEvent::Deleted(pod)) => {
                pod
            }
            Ok(WatchEvent::Bookmark { resource_version }) => {
                assert!(!resource_version.is_empty());
                continue;
            }
            Ok(WatchEvent::Error(status)) => {
                let _ = ApiError::from_status(200, status).to_string();
                continue;
            }
            Err(_) => continue,
        };
        let names = pod.spec.containers.iter().map(|c| c.name.as_str());
        for name in names.chain(["shell"]) {
            match evaluate(&pod, name) {
                PodState::Terminated { exit_code } => {
                    assert_eq!(terminated_exit_code(&pod, name), Some(exit_code))
                }
                PodState::Ready => {
                    assert_eq!(pod.status.phase.as_deref(), Some("Running"));
                    assert!(pod.metadata.deletion_timestamp.is_none());
                }
                PodState::Failed { reason, .. } => assert!(!reason.is_empty()),
                PodState::Pending => {}
            }
        }
    }
}

/// Kubeconfig text: parsing and context selection never panic and never read host files.
pub fn fuzz_kubeconfig(data: &[u8]) {
    crate::backend::kubernetes::kubeconfig::fuzz_kubeconfig(data);
}

/// The audit recordings' CBOR decoder (`containerssh audit decode` reads files an operator
/// was handed): never panics, never claims more bytes than it was given, and an item it
/// decoded decodes the same from exactly its own bytes; a cut item is only ever incomplete.
pub fn fuzz_audit_cbor(data: &[u8]) {
    use crate::audit::cbor::{decode, DecodeError};
    match decode(data) {
        Ok((value, used)) => {
            assert!(used > 0 && used <= data.len());
            let own = data.get(..used).unwrap_or_default();
            assert_eq!(decode(own), Ok((value, used)));
            if let Some(cut) = used.checked_sub(1).and_then(|n| data.get(..n)) {
                assert_eq!(decode(cut).err(), Some(DecodeError::Incomplete));
            }
        }
        Err(DecodeError::Incomplete | DecodeError::Invalid(_)) => {}
    }
}

#[cfg(test)]
mod tests {
    type Harness = fn(&[u8]);

    /// Every committed seed passes its harness, so plain `cargo test` (stable, no libFuzzer)
    /// keeps the seeds and the invariants honest between fuzzing runs.
    #[test]
    fn seed_corpora_pass_their_harnesses() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let targets: [(&str, Harness); 14] = [
            ("config_yaml", super::fuzz_config),
            ("docker_demux", super::fuzz_docker_demux),
            ("go_duration", super::fuzz_go_duration),
            ("split_words", super::fuzz_split_words),
            ("authorized_keys", super::fuzz_authorized_keys),
            ("agent_args", super::fuzz_agent_args),
            ("agent_proto", super::fuzz_agent_proto),
            ("kube_frames", super::fuzz_kube_frames),
            ("kube_status", super::fuzz_kube_status),
            ("kubeconfig", super::fuzz_kubeconfig),
            ("auth_response", super::fuzz_auth_response),
            ("cert_options", super::fuzz_cert_options),
            ("proxy_header", super::fuzz_proxy_header),
            ("audit_cbor", super::fuzz_audit_cbor),
        ];
        // Every target in fuzz/Cargo.toml has a harness here, hence a committed corpus
        // (fuzz/run-ci.sh refuses a target without one).
        let manifest =
            std::fs::read_to_string(root.join("../Cargo.toml")).expect("fuzz/Cargo.toml");
        let mut listed: Vec<&str> = manifest
            .split("[[bin]]")
            .skip(1)
            .filter_map(|bin| bin.lines().find_map(|l| l.strip_prefix("name = ")))
            .map(|name| name.trim_matches('"'))
            .collect();
        listed.sort_unstable();
        let mut covered: Vec<&str> = targets.iter().map(|(name, _)| *name).collect();
        covered.sort_unstable();
        assert_eq!(listed, covered, "fuzz targets without a seed check");
        for (target, harness) in targets {
            let seeds = std::fs::read_dir(root.join(target))
                .unwrap_or_else(|e| panic!("seed corpus {target}: {e}"));
            let mut count = 0;
            for seed in seeds {
                let path = seed.expect("list seeds").path();
                eprintln!("{target}: {}", path.display());
                harness(&std::fs::read(&path).expect("read seed"));
                count += 1;
            }
            assert!(count > 0, "no seeds for {target}");
        }
    }
}
