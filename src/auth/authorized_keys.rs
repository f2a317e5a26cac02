//! Public-key authentication against OpenSSH-format `authorized_keys` files,
//! one file per user, located through a path template.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use russh::keys::{Algorithm, PublicKey};
use tracing::{debug, info, warn};

use super::key_options::{self, LineError, LineOptions};
use super::{numbered_lines, read_capped, AuthError};

/// Longest accepted user name, in bytes. The name becomes (part of) one path
/// component, and 255 bytes is `NAME_MAX` on Linux filesystems, so a longer
/// name could never name an existing file anyway.
pub const MAX_USERNAME_LEN: usize = 255;

/// Largest `authorized_keys` file read; OpenSSH has no limit, but thousands of
/// keys fit in 1 MiB and a larger file is almost certainly a mistake.
pub const MAX_AUTHORIZED_KEYS_BYTES: u64 = 1 << 20;

/// Where to find each user's `authorized_keys` file.
#[derive(Debug, Clone)]
pub struct AuthorizedKeys {
    /// Path with `%u` (user name) and `%%` (literal `%`), as in sshd_config.
    template: String,
}

/// Restrictions and settings attached to the key line that authorised a
/// login. The default (all `false`, no command) is an unrestricted key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOptions {
    /// Forced command from `command="..."`, run instead of what the client asked.
    pub command: Option<String>,
    /// `environment="NAME=value"` pairs in file order; the first value of a
    /// name wins, as in OpenSSH.
    pub environment: Vec<(String, String)>,
    pub no_pty: bool,
    pub no_port_forwarding: bool,
    pub no_agent_forwarding: bool,
    pub no_x11_forwarding: bool,
}

impl AuthorizedKeys {
    pub fn new(template: impl Into<String>) -> Self {
        Self {
            template: template.into(),
        }
    }

    /// Checks the path template, so a typo is reported at start-up rather
    /// than on the first login.
    pub fn check_template(&self) -> Result<(), AuthError> {
        self.expand("user").map(drop)
    }

    /// Returns the options of the first line whose key matches `key` and
    /// whose `from=` and `expiry-time=` restrictions admit this login.
    ///
    /// Reads the user's file fresh on each call (edits apply without
    /// restart). A missing file, an unusable user name or no matching line
    /// is `Ok(None)`; lines that cannot be parsed are skipped with a warning.
    pub fn find(
        &self,
        user: &str,
        key: &PublicKey,
        remote_ip: IpAddr,
        now: SystemTime,
    ) -> Result<Option<KeyOptions>, AuthError> {
        if let Err(reason) = check_user_name(user) {
            debug!(user = ?user, reason, "user name not usable in a path; no authorized keys");
            return Ok(None);
        }
        let path = self.expand(user)?;
        let contents = match read_capped(&path, MAX_AUTHORIZED_KEYS_BYTES) {
            Ok(Some(contents)) => contents,
            Ok(None) => {
                return Err(AuthError::AuthorizedKeysTooLarge {
                    path,
                    limit: MAX_AUTHORIZED_KEYS_BYTES,
                })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                debug!(path = %path.display(), "no authorized keys file");
                return Ok(None);
            }
            Err(source) => return Err(AuthError::ReadAuthorizedKeys { path, source }),
        };
        // A clock before 1970 is broken; treating it as 0 only makes expiry
        // checks stricter than the real time would.
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));

        for (line_no, raw) in numbered_lines(&contents) {
            let skip = |reason: &dyn std::fmt::Display| {
                warn!(code = "AUTH_KEYS_LINE_SKIPPED", path = %path.display(), line = line_no, %reason, "skipping authorized_keys line");
            };
            let Ok(line) = std::str::from_utf8(raw) else {
                skip(&"not valid UTF-8");
                continue;
            };
            let line = line.trim_start_matches([' ', '\t']).trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (entry_key, opts) = match parse_line(line) {
                Ok(entry) => entry,
                Err(e) => {
                    skip(&e);
                    continue;
                }
            };
            if opts.cert_authority {
                skip(&"cert-authority lines are not supported yet");
                continue;
            }
            // russh cannot tell us whether a security key was touched, so
            // only lines that waive the touch requirement can be honoured.
            if is_security_key(&entry_key) && !opts.no_touch_required {
                skip(&"security keys need no-touch-required (touch is not verified)");
                continue;
            }
            // The algorithm lives inside the key data, and RSA key data is
            // the same whichever rsa-sha2-* signature scheme was offered.
            if entry_key.key_data() != key.key_data() {
                continue;
            }
            if let Some(expiry) = opts.expiry.filter(|&expiry| now > expiry) {
                info!(code = "AUTH_KEY_EXPIRED", path = %path.display(), line = line_no, expiry, "matching key has expired");
                continue;
            }
            if let Some(from) = opts.from.as_ref().filter(|from| !from.matches(remote_ip)) {
                info!(code = "AUTH_KEY_SOURCE_NOT_PERMITTED", path = %path.display(), line = line_no, %remote_ip, from = from.as_str(), "matching key not permitted from this address");
                continue;
            }
            debug!(path = %path.display(), line = line_no, "public key accepted");
            return Ok(Some(opts.granted));
        }
        Ok(None)
    }

    fn expand(&self, user: &str) -> Result<PathBuf, AuthError> {
        let fail = |reason| AuthError::ExpandAuthorizedKeysPath {
            template: self.template.clone(),
            reason,
        };
        let mut out = String::with_capacity(self.template.len() + user.len());
        let mut chars = self.template.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('u') => out.push_str(user),
                Some(_) => return Err(fail("only %u and %% are supported")),
                None => return Err(fail("ends with a lone %")),
            }
        }
        if out.is_empty() {
            return Err(fail("empty path"));
        }
        Ok(PathBuf::from(out))
    }
}

/// Refuses names that could escape the directory in the template or forge
/// log lines; such a user simply has no keys.
pub(crate) fn check_user_name(user: &str) -> Result<(), &'static str> {
    if user.is_empty() {
        Err("empty")
    } else if user.len() > MAX_USERNAME_LEN {
        Err("too long")
    } else if user == "." || user == ".." {
        Err("dot path component")
    } else if user.contains('/') {
        Err("contains '/'")
    } else if user.chars().any(char::is_control) {
        Err("contains a control character")
    } else {
        Ok(())
    }
}

fn is_security_key(key: &PublicKey) -> bool {
    is_security_key_algorithm(&key.algorithm())
}

/// FIDO keys (`sk-ssh-ed25519@openssh.com`, `sk-ecdsa-sha2-nistp256@openssh.com`).
pub(crate) fn is_security_key_algorithm(a: &Algorithm) -> bool {
    matches!(a, Algorithm::SkEd25519 | Algorithm::SkEcdsaSha2NistP256)
}

/// Like OpenSSH, first tries the line as a bare key and only then as
/// options followed by a key, because either form may contain spaces.
fn parse_line(line: &str) -> Result<(PublicKey, LineOptions), LineError> {
    if let Some(key) = parse_key(line) {
        return Ok((key, LineOptions::default()));
    }
    let (opts, rest) = key_options::split_options(line);
    let key = parse_key(rest).ok_or(LineError::InvalidKey)?;
    Ok((key, key_options::parse(opts)?))
}

/// Parses `type base64 [comment]`; the comment is dropped because it plays
/// no part in matching.
fn parse_key(s: &str) -> Option<PublicKey> {
    let mut fields = s.split([' ', '\t']).filter(|f| !f.is_empty());
    let (kind, data) = (fields.next()?, fields.next()?);
    PublicKey::from_openssh(&format!("{kind} {data}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::public::{Ed25519PublicKey, KeyData, SkEd25519};
    use russh::keys::ssh_key::rand_core::{Infallible, TryCryptoRng, TryRng};
    use russh::keys::PrivateKey;
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    struct OsRng;
    impl TryRng for OsRng {
        type Error = Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Infallible> {
            let mut b = [0; 4];
            self.try_fill_bytes(&mut b)?;
            Ok(u32::from_le_bytes(b))
        }
        fn try_next_u64(&mut self) -> Result<u64, Infallible> {
            let mut b = [0; 8];
            self.try_fill_bytes(&mut b)?;
            Ok(u64::from_le_bytes(b))
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
            getrandom::fill(dst).expect("OS RNG");
            Ok(())
        }
    }
    impl TryCryptoRng for OsRng {}

    fn random_key() -> PublicKey {
        let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).expect("keygen");
        key.public_key().clone()
    }

    fn openssh(key: &PublicKey) -> String {
        key.to_openssh().expect("encode key")
    }

    /// A key directory with the template `<dir>/%u`.
    fn setup(files: &[(&str, String)]) -> (tempfile::TempDir, AuthorizedKeys) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).expect("write keys");
        }
        let keys = AuthorizedKeys::new(format!("{}/%u", dir.path().display()));
        (dir, keys)
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 3, 4));

    fn find(keys: &AuthorizedKeys, user: &str, key: &PublicKey) -> Option<KeyOptions> {
        keys.find(user, key, IP, SystemTime::now())
            .expect("readable")
    }

    #[test]
    fn matches_key_data_and_ignores_comments() {
        let (key, other) = (random_key(), random_key());
        let mut line = openssh(&key);
        line.push_str(" comment in file");
        let (_dir, keys) = setup(&[("alice", line)]);
        let mut offered = key.clone();
        offered.set_comment("different comment");
        assert_eq!(find(&keys, "alice", &offered), Some(KeyOptions::default()));
        assert_eq!(find(&keys, "alice", &other), None);
    }

    #[test]
    fn template_substitutes_user_and_percent() {
        let (a, b) = (random_key(), random_key());
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("100%");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(sub.join("alice.keys"), openssh(&a)).expect("write");
        std::fs::write(sub.join("bob.keys"), openssh(&b)).expect("write");
        let keys = AuthorizedKeys::new(format!("{}/100%%/%u.keys", dir.path().display()));
        keys.check_template().expect("valid template");
        assert!(find(&keys, "alice", &a).is_some() && find(&keys, "bob", &b).is_some());
        assert!(find(&keys, "alice", &b).is_none() && find(&keys, "bob", &a).is_none());
        for bad in ["/k/%h", "/k/%"] {
            let keys = AuthorizedKeys::new(bad);
            assert!(matches!(
                keys.check_template(),
                Err(AuthError::ExpandAuthorizedKeysPath { .. })
            ));
            assert!(keys.find("alice", &a, IP, SystemTime::now()).is_err());
        }
    }

    #[test]
    fn traversal_and_odd_user_names_are_not_authorised() {
        let key = random_key();
        let dir = tempfile::tempdir().expect("tempdir");
        // Every bad name below would reach a file holding the key.
        std::fs::create_dir_all(dir.path().join("keys/x")).expect("mkdir");
        for file in [
            "secret",
            "ak",
            "keys/x/ak",
            "keys/ak",
            "keys/a\nb",
            "keys/a\0",
        ] {
            let _ = std::fs::write(dir.path().join(file), openssh(&key));
        }
        let nested = AuthorizedKeys::new(format!("{}/keys/%u/ak", dir.path().display()));
        let flat = AuthorizedKeys::new(format!("{}/keys/%u", dir.path().display()));
        assert!(
            find(&nested, "x", &key).is_some(),
            "control case must match"
        );
        for (keys, user) in [
            (&nested, ".."),
            (&nested, "."),
            (&flat, "../secret"),
            (&nested, "x/.."),
        ] {
            assert_eq!(find(keys, user, &key), None, "{user:?}");
        }
        let long = "a".repeat(MAX_USERNAME_LEN + 1);
        for user in ["", "a\nb", "a\0", "a\u{1b}[0m", long.as_str()] {
            assert_eq!(find(&flat, user, &key), None, "{user:?}");
        }
    }

    #[test]
    fn missing_file_is_none_and_oversize_file_is_an_error() {
        let key = random_key();
        let big = format!("#{}\n{}", "x".repeat(1 << 20), openssh(&key));
        let (dir, keys) = setup(&[("big", big)]);
        assert_eq!(find(&keys, "nobody", &key), None);
        let err = keys
            .find("big", &key, IP, SystemTime::now())
            .expect_err("too big");
        assert!(err
            .to_string()
            .contains(&dir.path().join("big").display().to_string()));
        assert!(matches!(err, AuthError::AuthorizedKeysTooLarge { .. }));
    }

    #[test]
    fn from_restricts_source_addresses() {
        let key = random_key();
        let line = format!("from=\"10.0.0.0/8,!10.1.0.0/16\" {}", openssh(&key));
        let (_dir, keys) = setup(&[("alice", line)]);
        let now = SystemTime::now();
        for (addr, ok) in [
            ("10.2.3.4", true),
            ("::ffff:10.9.9.9", true),
            ("10.1.0.5", false),
            ("192.0.2.1", false),
        ] {
            let got = keys
                .find("alice", &key, addr.parse().expect("ip"), now)
                .expect("ok");
            assert_eq!(got.is_some(), ok, "{addr}");
        }
    }

    #[test]
    fn expiry_time_is_inclusive_and_later_lines_still_count() {
        let key = random_key();
        let contents = format!(
            "expiry-time=\"20240101000000\" {k}\nexpiry-time=\"20240102\",command=\"later\" {k}\n",
            k = openssh(&key)
        );
        let (_dir, keys) = setup(&[("alice", contents)]);
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        let find_at = |secs| keys.find("alice", &key, IP, at(secs)).expect("ok");
        assert_eq!(find_at(1_704_067_200), Some(KeyOptions::default()));
        let second = find_at(1_704_067_201).expect("second line still valid");
        assert_eq!(second.command.as_deref(), Some("later"));
        assert_eq!(find_at(1_704_153_601), None);
    }

    #[test]
    fn options_are_returned_for_the_matching_line() {
        let key = random_key();
        let line = format!(
            r#"restrict,pty,command="echo \"a, b\"",environment="A=1,2",environment="B=x y" {}"#,
            openssh(&key)
        );
        let (_dir, keys) = setup(&[("alice", line)]);
        let want = KeyOptions {
            command: Some(r#"echo "a, b""#.into()),
            environment: vec![("A".into(), "1,2".into()), ("B".into(), "x y".into())],
            no_pty: false,
            no_port_forwarding: true,
            no_agent_forwarding: true,
            no_x11_forwarding: true,
        };
        assert_eq!(find(&keys, "alice", &key), Some(want));
    }

    #[test]
    fn bad_lines_are_skipped_and_later_lines_match() {
        let key = random_key();
        let k = openssh(&key);
        let sk = PublicKey::from(KeyData::SkEd25519(SkEd25519::new(
            Ed25519PublicKey([7; 32]),
            "ssh:",
        )));
        let contents = format!(
            "permitopen=\"h:1\" {k}\ncert-authority {k}\nssh-ed25519 AAAAnotbase64\n\
             {sk}\n   # comment\n\nno-touch-required,command=\"sk\" {sk}\nno-pty {k}\n",
            sk = openssh(&sk)
        );
        let mut bytes = vec![0xff, b'\n'];
        bytes.extend_from_slice(contents.as_bytes());
        let (dir, keys) = setup(&[]);
        std::fs::write(dir.path().join("alice"), bytes).expect("write");
        let got = find(&keys, "alice", &key).expect("last line matches");
        assert!(got.no_pty && got.command.is_none());
        let got = find(&keys, "alice", &sk).expect("sk line with no-touch-required");
        assert_eq!(got.command.as_deref(), Some("sk"));
    }

    /// The real `ssh-keygen` (openssh-client, installed by tests/run.sh); missing is a failure.
    fn ssh_keygen(dir: &Path, name: &str, args: &[&str]) -> PublicKey {
        let path = dir.join(name);
        let status = Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-C", "test@host", "-f"])
            .arg(&path)
            .args(args)
            .status()
            .expect("run ssh-keygen (package openssh-client)");
        assert!(status.success(), "ssh-keygen {args:?}");
        let text = std::fs::read_to_string(path.with_extension("pub")).expect("read .pub");
        PublicKey::from_openssh(&text).expect("parse .pub")
    }

    #[test]
    fn ssh_keygen_keys_match_their_own_lines() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let kinds: [(&str, &[&str]); 4] = [
            ("ed", &["-t", "ed25519"]),
            ("ec", &["-t", "ecdsa", "-b", "384"]),
            ("rsa", &["-t", "rsa", "-b", "2048"]),
            ("stray", &["-t", "ed25519"]),
        ];
        let mut generated = Vec::new();
        for (name, args) in kinds {
            generated.push((name, ssh_keygen(tmp.path(), name, args)));
        }
        let lines: String = generated[..3]
            .iter()
            .map(|(name, key)| format!("command=\"{name}\" {}\n", openssh(key)))
            .collect();
        let (_dir, keys) = setup(&[("alice", lines)]);
        for (name, key) in &generated[..3] {
            let got = find(&keys, "alice", key).expect("own line matches");
            assert_eq!(got.command.as_deref(), Some(*name));
        }
        assert_eq!(find(&keys, "alice", &generated[3].1), None);
        // A client signing with rsa-sha2-256/512 still sends the ssh-rsa
        // key blob, which is what the server handler is given.
        let rsa = &generated[2].1;
        let blob = rsa.to_bytes().expect("encode");
        let offered = PublicKey::from_bytes(&blob).expect("decode");
        assert_eq!(
            find(&keys, "alice", &offered).and_then(|o| o.command),
            Some("rsa".into())
        );
    }
}
