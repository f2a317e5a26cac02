//! Password authentication against a file of `user:HASH` lines, where HASH
//! is a modular-crypt string: `$argon2id$`/`$argon2i$`/`$argon2d$`,
//! bcrypt `$2a$`/`$2b$`/`$2y$`, or SHA-crypt `$6$`/`$5$`.

use std::path::PathBuf;
use std::sync::OnceLock;

use argon2::password_hash::{Error as HashError, PasswordHasher, PasswordVerifier};
use argon2::{Argon2, PasswordHash};
use sha_crypt::ShaCrypt;
use tracing::{debug, warn};

use super::{numbered_lines, read_capped, AuthError};

/// Longest password that is hashed. Real passwords are far shorter, and
/// SHA-crypt's cost grows with the password length, so a cap keeps a
/// hostile client from buying expensive work cheaply.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Largest password file read (about ten thousand argon2id lines).
pub const MAX_PASSWORD_FILE_BYTES: u64 = 1 << 20;

/// Salt of the dummy hash; it needs no secrecy because the dummy only burns
/// time and can never authenticate anyone.
const DUMMY_SALT: &[u8] = b"containerssh-dummy-salt";

/// A `user:HASH` password file, re-read on every verification.
#[derive(Debug, Clone)]
pub struct PasswordFile {
    path: PathBuf,
}

#[derive(Debug, Clone, Copy)]
enum Scheme {
    Argon2,
    Bcrypt,
    ShaCrypt,
}

/// The outcome of looking a user up in the file.
enum Entry<'a> {
    Found {
        line: usize,
        scheme: Scheme,
        hash: &'a str,
    },
    /// No line for the user, or the user's line cannot be used.
    Unusable,
}

impl PasswordFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Checks `password` for `user`. Synchronous and CPU-heavy (tens to
    /// hundreds of milliseconds): call it from `spawn_blocking`.
    ///
    /// Every rejection costs about one hash verification, whether or not the
    /// user exists, so timing does not reveal which user names are valid.
    pub fn verify(&self, user: &str, password: &[u8]) -> Result<bool, AuthError> {
        let contents = match read_capped(&self.path, MAX_PASSWORD_FILE_BYTES) {
            Ok(Some(contents)) => contents,
            Ok(None) => {
                return Err(AuthError::PasswordFileTooLarge {
                    path: self.path.clone(),
                    limit: MAX_PASSWORD_FILE_BYTES,
                })
            }
            Err(source) => {
                return Err(AuthError::ReadPasswordFile {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let entry = self.lookup(&contents, user);
        if password.len() > MAX_PASSWORD_BYTES {
            debug!(user = ?user, "password longer than {MAX_PASSWORD_BYTES} bytes rejected");
            spend_dummy_time(b"");
            return Ok(false);
        }
        let Entry::Found { line, scheme, hash } = entry else {
            spend_dummy_time(password);
            return Ok(false);
        };
        if let Some(why) = too_costly(scheme, hash) {
            warn!(code = "AUTH_PASSWORD_HASH_TOO_COSTLY", path = %self.path.display(), line, ?scheme, reason = why, "password hash too expensive to verify; user cannot log in");
            spend_dummy_time(password);
            return Ok(false);
        }
        match check(scheme, hash, password) {
            Ok(matched) => Ok(matched),
            Err(()) => {
                warn!(code = "AUTH_PASSWORD_HASH_MALFORMED", path = %self.path.display(), line, ?scheme, "malformed password hash; user cannot log in");
                spend_dummy_time(password);
                Ok(false)
            }
        }
    }

    /// The first line naming the user decides: a later line never rescues
    /// a broken one, which would make the file's meaning depend on typos.
    fn lookup<'a>(&self, contents: &'a [u8], user: &str) -> Entry<'a> {
        if user.is_empty() {
            return Entry::Unusable;
        }
        for (line, raw) in numbered_lines(contents) {
            let skip = |reason: &str| {
                warn!(code = "AUTH_PASSWORD_LINE_SKIPPED", path = %self.path.display(), line, reason, "skipping password file line");
            };
            let Ok(text) = std::str::from_utf8(raw) else {
                skip("not valid UTF-8");
                continue;
            };
            let text = text.trim_end();
            if text.trim_start().is_empty() || text.trim_start().starts_with('#') {
                continue;
            }
            let Some((name, hash)) = text.split_once(':') else {
                skip("expected user:HASH");
                continue;
            };
            // User names are not secret, so an ordinary comparison is fine.
            if name != user {
                continue;
            }
            let hash = hash.trim();
            return match scheme_of(hash) {
                Some(scheme) => Entry::Found { line, scheme, hash },
                None => {
                    skip("unknown hash scheme; user cannot log in");
                    Entry::Unusable
                }
            };
        }
        Entry::Unusable
    }
}

fn scheme_of(hash: &str) -> Option<Scheme> {
    const PREFIXES: [(&str, Scheme); 8] = [
        ("$argon2id$", Scheme::Argon2),
        ("$argon2i$", Scheme::Argon2),
        ("$argon2d$", Scheme::Argon2),
        // `$2x$` marks hashes from a buggy old implementation that the
        // bcrypt crate does not reproduce, so it is not offered.
        ("$2a$", Scheme::Bcrypt),
        ("$2b$", Scheme::Bcrypt),
        ("$2y$", Scheme::Bcrypt),
        ("$5$", Scheme::ShaCrypt),
        ("$6$", Scheme::ShaCrypt),
    ];
    PREFIXES
        .iter()
        .find(|(prefix, _)| hash.starts_with(prefix))
        .map(|&(_, scheme)| scheme)
}

/// Why verifying `hash` would cost more than a login attempt may make us spend (memory and
/// time an unauthenticated client can ask for), if it would.
fn too_costly(scheme: Scheme, hash: &str) -> Option<&'static str> {
    use crate::limits::{
        MAX_ARGON2_MEMORY_KIB, MAX_ARGON2_PASSES, MAX_BCRYPT_COST, MAX_SHA_CRYPT_ROUNDS,
    };
    match scheme {
        Scheme::Argon2 => {
            let parsed = PasswordHash::new(hash).ok()?;
            let get = |k: &str| parsed.params.get_decimal(k);
            if get("m").is_some_and(|m| m > MAX_ARGON2_MEMORY_KIB) {
                return Some("argon2 memory cost over 64 MiB");
            }
            if get("t").is_some_and(|t| t > MAX_ARGON2_PASSES) {
                return Some("argon2 time cost over 64 passes");
            }
            None
        }
        Scheme::Bcrypt => {
            // `$2b$NN$…`
            let cost: u32 = hash.get(4..6)?.parse().ok()?;
            (cost > MAX_BCRYPT_COST).then_some("bcrypt cost over 16")
        }
        Scheme::ShaCrypt => {
            // `$6$rounds=N$salt$hash`; without `rounds=` the default 5000 applies.
            let field = hash.split('$').nth(2)?;
            let rounds: u32 = field.strip_prefix("rounds=")?.parse().ok()?;
            (rounds > MAX_SHA_CRYPT_ROUNDS).then_some("SHA-crypt rounds over 1000000")
        }
    }
}

/// `Err(())` means the hash itself is unusable; the libraries compare the
/// digests in constant time.
fn check(scheme: Scheme, hash: &str, password: &[u8]) -> Result<bool, ()> {
    let outcome = match scheme {
        Scheme::Argon2 => Argon2::default().verify_password(password, hash),
        Scheme::ShaCrypt => ShaCrypt::default().verify_password(password, hash),
        // bcrypt only looks at the first 72 bytes, like every other
        // implementation; refusing longer passwords would break existing
        // hashes.
        Scheme::Bcrypt => return bcrypt::verify(password, hash).map_err(drop),
    };
    match outcome {
        Ok(()) => Ok(true),
        Err(HashError::PasswordInvalid) => Ok(false),
        Err(_) => Err(()),
    }
}

/// Burns about as much CPU as checking a typical argon2id hash (the crate's
/// default parameters, as produced by [`hash_password_argon2id`]).
fn spend_dummy_time(password: &[u8]) {
    #[cfg(test)]
    tests::DUMMY_RUNS.with(|runs| runs.set(runs.get() + 1));
    static DUMMY: OnceLock<Option<PasswordHash>> = OnceLock::new();
    let dummy = DUMMY.get_or_init(|| {
        Argon2::default()
            .hash_password_with_salt(b"containerssh dummy password", DUMMY_SALT)
            .inspect_err(|e| warn!(code = "AUTH_DUMMY_HASH_FAILED", error = %e, "cannot build the dummy password hash"))
            .ok()
    });
    if let Some(dummy) = dummy {
        // The outcome is irrelevant; only the time spent matters.
        let _ = Argon2::default().verify_password(password, dummy);
    }
}

/// Hashes `password` with argon2id (default parameters, random 16-byte
/// salt) into a PHC string suitable for a password file line.
pub fn hash_password_argon2id(password: &[u8]) -> Result<String, AuthError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(AuthError::HashPasswordTooLong {
            limit: MAX_PASSWORD_BYTES,
        });
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|source| AuthError::GenerateSalt { source })?;
    Argon2::default()
        .hash_password_with_salt(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|source| AuthError::HashPassword { source })
}

#[cfg(test)]
mod cost_tests {
    use super::*;

    #[test]
    fn hashes_beyond_the_cost_limits_are_not_verified() {
        let costly = [
            (Scheme::Argon2, "$argon2id$v=19$m=1048576,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4"),
            (Scheme::Argon2, "$argon2id$v=19$m=256,t=1000,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4"),
            (Scheme::Bcrypt, "$2b$31$EGdrhbKUv8Oc9vGiXX0HQOxSg445d458Muh7DAHskb6QbtCvdxcie"),
            (Scheme::ShaCrypt, "$6$rounds=999999999$saltstring$x"),
        ];
        for (scheme, hash) in costly {
            assert!(too_costly(scheme, hash).is_some(), "{hash}");
        }
        let fine = [
            (Scheme::Argon2, "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4"),
            (Scheme::Bcrypt, "$2b$12$EGdrhbKUv8Oc9vGiXX0HQOxSg445d458Muh7DAHskb6QbtCvdxcie"),
            (Scheme::ShaCrypt, "$6$saltstring$x"),
            (Scheme::ShaCrypt, "$6$rounds=5000$saltstring$x"),
        ];
        for (scheme, hash) in fine {
            assert!(too_costly(scheme, hash).is_none(), "{hash}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::process::Command;

    thread_local! {
        /// Per thread, because the test harness runs tests in parallel.
        pub(super) static DUMMY_RUNS: Cell<usize> = const { Cell::new(0) };
    }

    /// Runs `verify` and reports whether the dummy hash was used.
    fn verify(file: &PasswordFile, user: &str, password: &[u8]) -> (bool, bool) {
        let before = DUMMY_RUNS.with(Cell::get);
        let ok = file.verify(user, password).expect("password file readable");
        (ok, DUMMY_RUNS.with(Cell::get) > before)
    }

    fn write(contents: &str) -> (tempfile::TempDir, PasswordFile) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwords");
        std::fs::write(&path, contents).expect("write password file");
        (dir, PasswordFile::new(path))
    }

    // Reference vectors: argon2 from the phc-winner-argon2 test suite,
    // bcrypt from python-bcrypt / Openwall crypt_blowfish, SHA-crypt from
    // Drepper's specification (also what `openssl passwd -5/-6` prints).
    const VECTORS: &[(&str, &str)] = &[
        (
            "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4",
            "password",
        ),
        (
            "$argon2i$v=19$m=256,t=2,p=1$c29tZXNhbHQ$iekCn0Y3spW+sCcFanM2xBT63UP2sghkUoHLIUpWRS8",
            "password",
        ),
        (
            "$2b$04$EGdrhbKUv8Oc9vGiXX0HQOxSg445d458Muh7DAHskb6QbtCvdxcie",
            "correctbatteryhorsestapler",
        ),
        (
            "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW",
            "U*U",
        ),
        // $2y$ differs from $2a$ only in name for ASCII passwords.
        (
            "$2y$04$UuTkLRZZ6QofpDOlMz32MuuxEHA43WOemOYHPz6.SjsVsyO1tDU96",
            "password",
        ),
        (
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
            "Hello world!",
        ),
        (
            "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5",
            "Hello world!",
        ),
    ];

    #[test]
    fn known_vectors_verify_and_reject_wrong_passwords() {
        for (hash, password) in VECTORS {
            let (_dir, file) = write(&format!("alice:{hash}\n"));
            assert_eq!(
                verify(&file, "alice", password.as_bytes()),
                (true, false),
                "{hash}"
            );
            assert_eq!(verify(&file, "alice", b"wrong"), (false, false), "{hash}");
        }
    }

    #[test]
    fn crate_generated_hashes_verify() {
        let argon2d = Argon2::new(
            argon2::Algorithm::Argon2d,
            argon2::Version::V0x13,
            argon2::Params::new(256, 2, 1, None).expect("params"),
        )
        .hash_password_with_salt(b"pw-d", b"saltsaltsalt")
        .expect("argon2d")
        .to_string();
        let bcrypt = bcrypt::hash("pw-b", 4).expect("bcrypt");
        let argon2id = hash_password_argon2id(b"pw-id").expect("argon2id");
        assert!(argon2id.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        let (_dir, file) = write(&format!("d:{argon2d}\nb:{bcrypt}\nid:{argon2id}\n"));
        for (user, good) in [("d", "pw-d"), ("b", "pw-b"), ("id", "pw-id")] {
            assert_eq!(
                verify(&file, user, good.as_bytes()),
                (true, false),
                "{user}"
            );
            assert_eq!(verify(&file, user, b"pw-x"), (false, false), "{user}");
        }
    }

    #[test]
    fn openssl_sha_crypt_hashes_verify() {
        for scheme in ["-5", "-6"] {
            let out = Command::new("openssl")
                .args(["passwd", scheme, "correct horse"])
                .output()
                .expect("run openssl (package openssl, installed by tests/run.sh)");
            assert!(out.status.success(), "openssl passwd {scheme} failed");
            let hash = String::from_utf8(out.stdout).expect("utf-8");
            let (_dir, file) = write(&format!("carol:{}", hash.trim()));
            assert_eq!(verify(&file, "carol", b"correct horse"), (true, false));
            assert_eq!(verify(&file, "carol", b"correct horsf"), (false, false));
        }
    }

    #[test]
    fn unknown_user_spends_dummy_time() {
        let (_dir, file) = write(&format!("alice:{}\n", VECTORS[0].0));
        assert_eq!(verify(&file, "bob", b"password"), (false, true));
        assert_eq!(verify(&file, "", b"password"), (false, true));
    }

    #[test]
    fn unknown_scheme_disables_user_even_with_a_later_good_line() {
        let md5 = "$1$saltsalt$qjXMvbEw8oaL.CzflDugX/";
        let (_dir, file) = write(&format!("alice:{md5}\nalice:{}\n", VECTORS[0].0));
        assert_eq!(verify(&file, "alice", b"password"), (false, true));
        let (_dir, file) = write("alice:$argon2id$not-a-hash\n");
        assert_eq!(verify(&file, "alice", b"password"), (false, true));
    }

    #[test]
    fn oversize_password_is_refused_without_hashing_it() {
        // bcrypt ignores everything past 72 bytes, so without the length cap
        // this 1025-byte password would match.
        let hash = bcrypt::hash([b'a'; 72], 4).expect("bcrypt");
        let (_dir, file) = write(&format!("alice:{hash}\n"));
        let long = [b'a'; MAX_PASSWORD_BYTES + 1];
        assert_eq!(verify(&file, "alice", &long), (false, true));
        assert_eq!(
            verify(&file, "alice", &long[..MAX_PASSWORD_BYTES]),
            (true, false)
        );
        assert!(matches!(
            hash_password_argon2id(&long),
            Err(AuthError::HashPasswordTooLong { .. })
        ));
    }

    #[test]
    fn comments_blank_and_malformed_lines_are_skipped() {
        let (hash, password) = VECTORS[2];
        let contents = format!("# users\n\n   \nno colon here\r\nbob:{hash}\r\n");
        let (_dir, file) = write(&contents);
        assert_eq!(verify(&file, "bob", password.as_bytes()), (true, false));
        assert_eq!(verify(&file, "no colon here", b"x"), (false, true));
        assert_eq!(verify(&file, "# users", b"x"), (false, true));
    }

    #[test]
    fn unreadable_and_oversize_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = PasswordFile::new(dir.path().join("absent"));
        assert!(matches!(
            missing.verify("alice", b"pw"),
            Err(AuthError::ReadPasswordFile { .. })
        ));
        let big = "#".repeat(usize::try_from(MAX_PASSWORD_FILE_BYTES).expect("fits") + 1);
        let (_dir, file) = write(&big);
        assert!(matches!(
            file.verify("alice", b"pw"),
            Err(AuthError::PasswordFileTooLarge { .. })
        ));
    }
}
