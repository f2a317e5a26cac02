//! The janitor's memory across runs: the places other than the configuration's own where this
//! instance created containers or pods (a config webhook's other engine, cluster or namespace
//! for a login), kept in `<stateDirectory>/backends.json` so that the next start reaps them as
//! it reaps the configuration's backend. A record is written before the login's container is
//! started, and removed once a reap of its place has succeeded with no connection left.
//!
//! The file is opened (created 0600) before the sandbox, which lets nothing be opened for
//! writing later, and rewritten in place through that descriptor. It holds the logins'
//! backend blocks, credentials included, as the state directory holds the host key.
//! At most [`MAX_RECORDS`] records, each at most [`MAX_RECORD_BYTES`]; a file over
//! [`MAX_FILE_BYTES`] is not read.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The file in the state directory.
pub const LEDGER_FILE: &str = "backends.json";
/// Places recorded at once (as many as the janitor remembers).
pub const MAX_RECORDS: usize = super::janitor::MAX_PLACES;
/// One record's backend block, encoded.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;
/// The whole file.
pub const MAX_FILE_BYTES: u64 = (MAX_RECORDS * (MAX_RECORD_BYTES + 1024)) as u64;

/// One place: its name (as the janitor logs it) and what rebuilds a backend for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub place: String,
    pub block: Value,
}

#[derive(Default, Serialize, Deserialize)]
struct Contents {
    records: Vec<Record>,
}

/// Why the ledger cannot be used; the server runs without it (a warning says what is lost).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot create {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: String },
}

pub struct Ledger {
    file: Mutex<File>,
    records: Mutex<Vec<Record>>,
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`; returns it with the records a previous run
    /// left (kept in it until their places are reaped). An unreadable content counts as
    /// empty, with a warning.
    pub fn open(dir: &Path) -> Result<(Self, Vec<Record>), LedgerError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| LedgerError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        let path = dir.join(LEDGER_FILE);
        let shown = || path.display().to_string();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| LedgerError::Open {
                path: shown(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| LedgerError::Open {
                path: shown(),
                source,
            })?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(LedgerError::TooLarge { path: shown() });
        }
        let mut text = String::new();
        let read = file.read_to_string(&mut text);
        let mut records = match read.ok().map(|_| serde_json::from_str::<Contents>(&text)) {
            _ if text.trim().is_empty() => Vec::new(),
            Some(Ok(c)) => c.records,
            _ => {
                tracing::warn!(code = "BACKEND_LEDGER_UNREADABLE", path = %shown(), "the janitor's ledger is unreadable: what it recorded is not reaped");
                Vec::new()
            }
        };
        records.truncate(MAX_RECORDS);
        let ledger = Self {
            file: Mutex::new(file),
            records: Mutex::new(records.clone()),
        };
        Ok((ledger, records))
    }

    /// Records a place (once); false when it cannot be (full, too large, not written).
    pub fn add(&self, record: Record) -> bool {
        let size = serde_json::to_vec(&record.block).map_or(usize::MAX, |v| v.len());
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if records.iter().any(|r| r.place == record.place) {
            return true;
        }
        if records.len() >= MAX_RECORDS || size > MAX_RECORD_BYTES {
            return false;
        }
        records.push(record);
        self.write(&records)
    }

    /// Forgets a place (its reap succeeded).
    pub fn remove(&self, place: &str) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let before = records.len();
        records.retain(|r| r.place != place);
        if records.len() != before {
            self.write(&records);
        }
    }

    /// Rewrites the file in place (the sandbox allows no new writable file).
    fn write(&self, records: &[Record]) -> bool {
        let contents = Contents {
            records: records.to_vec(),
        };
        let Ok(text) = serde_json::to_vec(&contents) else {
            return false;
        };
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let written = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&text))
            .and_then(|()| file.set_len(text.len() as u64));
        if let Err(e) = &written {
            tracing::warn!(code = "BACKEND_LEDGER_WRITE_FAILED", error = %e, "cannot write the janitor's ledger");
        }
        written.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(place: &str) -> Record {
        Record {
            place: place.into(),
            block: json!({"backend": "docker", "docker": {"connection": {"host": place}}}),
        }
    }

    #[test]
    fn records_survive_a_restart_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (ledger, old) = Ledger::open(&state).unwrap();
        assert!(old.is_empty());
        assert!(ledger.add(rec("a")));
        assert!(ledger.add(rec("b")));
        assert!(ledger.add(rec("a")), "a place is recorded once");
        drop(ledger);
        let mode = std::fs::metadata(state.join(LEDGER_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        let (ledger, old) = Ledger::open(&state).unwrap();
        assert_eq!(old, [rec("a"), rec("b")]);
        ledger.remove("a");
        drop(ledger);
        let (_, old) = Ledger::open(&state).unwrap();
        assert_eq!(old, [rec("b")], "shorter content leaves no tail behind");
    }

    #[test]
    fn bounded_and_robust_to_garbage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEDGER_FILE), "{not json").unwrap();
        let (ledger, old) = Ledger::open(dir.path()).unwrap();
        assert!(old.is_empty());
        for i in 0..MAX_RECORDS {
            assert!(ledger.add(rec(&i.to_string())));
        }
        assert!(!ledger.add(rec("one too many")));
        let huge = Record {
            place: "huge".into(),
            block: json!("x".repeat(MAX_RECORD_BYTES)),
        };
        ledger.remove("0");
        assert!(!ledger.add(huge));
    }
}
