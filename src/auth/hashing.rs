//! Password hashes are verified on a few threads of their own. Each argon2id verification
//! allocates its memory cost (19 MiB by default) and burns tens of milliseconds of CPU, and
//! unauthenticated clients choose when to ask for one: unbounded (`spawn_blocking` per
//! attempt) forty wrong passwords took the server from 10 MiB to 964 MiB. Here at most
//! [`MAX_HASH_WORKERS`] run at once and the rest wait their turn (the fixed rejection delay
//! hides the wait); the memory of a finished verification goes back to the system
//! (`sandbox::return_large_allocations`).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Semaphore};

use super::password::PasswordFile;
use super::AuthError;
use crate::limits::{MAX_HASH_QUEUE, MAX_HASH_WAIT, MAX_HASH_WORKERS};

struct Job {
    user: String,
    password: Vec<u8>,
    reply: oneshot::Sender<Result<bool, AuthError>>,
}

/// The threads that check passwords against a password file.
pub struct PasswordChecker {
    jobs: SyncSender<Job>,
    /// Jobs queued or running; never more than the channel holds, so sending never blocks.
    slots: Semaphore,
}

impl PasswordChecker {
    /// Starts one worker per core, at most [`MAX_HASH_WORKERS`].
    pub fn start(file: PasswordFile) -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_workers(file, cores.clamp(1, MAX_HASH_WORKERS), MAX_HASH_QUEUE)
    }

    fn with_workers(file: PasswordFile, workers: usize, queue: usize) -> std::io::Result<Self> {
        let file = Arc::new(file);
        let (jobs, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..workers {
            let (rx, file) = (Arc::clone(&rx), Arc::clone(&file));
            std::thread::Builder::new()
                .name(format!("password-hash-{n}"))
                .spawn(move || work(&rx, &file))?;
        }
        Ok(Self {
            jobs,
            slots: Semaphore::new(queue),
        })
    }

    /// Checks `password` for `user`, waiting (at most [`MAX_HASH_WAIT`]) for a place if all
    /// are taken: the wait happens inside a russh callback, so it must end.
    pub async fn verify(&self, user: &str, password: &[u8]) -> Result<bool, AuthError> {
        let _slot = match tokio::time::timeout(MAX_HASH_WAIT, self.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(AuthError::HashWorkers),
            Err(_) => {
                return Err(AuthError::HashBusy {
                    waited: MAX_HASH_WAIT,
                })
            }
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            user: user.to_string(),
            password: password.to_vec(),
            reply,
        };
        // Within capacity: a slot is held for every job queued or running.
        if let Err(e) = self.jobs.try_send(job) {
            let mut job = match e {
                std::sync::mpsc::TrySendError::Full(j)
                | std::sync::mpsc::TrySendError::Disconnected(j) => j,
            };
            wipe(&mut job.password);
            return Err(AuthError::HashWorkers);
        }
        answer.await.map_err(|_| AuthError::HashWorkers)?
    }
}

fn work(rx: &Mutex<Receiver<Job>>, file: &PasswordFile) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(mut job) = job else {
            return; // the checker is gone
        };
        let outcome = file.verify(&job.user, &job.password);
        wipe(&mut job.password);
        let _ = job.reply.send(outcome);
    }
}

fn wipe(b: &mut [u8]) {
    b.iter_mut().for_each(|x| *x = 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_on_its_workers_and_bounds_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwords");
        // A cheap hash (phc-winner-argon2's test vector), so many checks stay fast.
        let hash =
            "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4";
        std::fs::write(&path, format!("alice:{hash}\n")).unwrap();
        let file = PasswordFile::new(&path);
        let checker = Arc::new(PasswordChecker::with_workers(file, 2, 4).unwrap());
        assert!(checker.verify("alice", b"password").await.unwrap());
        assert!(!checker.verify("alice", b"no").await.unwrap());
        // More attempts than workers and queue together: all answered, in turn.
        let attempts: Vec<_> = (0..20)
            .map(|i| {
                let c = Arc::clone(&checker);
                let pw: &[u8] = if i == 3 { b"password" } else { b"x" };
                tokio::spawn(async move { c.verify("alice", pw).await })
            })
            .collect();
        let mut ok = 0;
        for a in attempts {
            ok += usize::from(a.await.unwrap().unwrap());
        }
        assert_eq!(ok, 1);
    }
}
