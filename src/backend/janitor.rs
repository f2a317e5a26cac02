//! Cleanup that survives faults. A connection's containers or pods are removed when it ends
//! ([`crate::ssh::connection::ConnCtx::close`]); when that fails because the engine or the API
//! server does not answer, the removal is handed here and retried in the background, with
//! backoff, until it succeeds — the server does not wait for its next start. At shutdown,
//! after the drain, every pending removal gets a last attempt and every place this run created
//! containers or pods in (the configuration's backend and each login's own, from the config
//! webhook) is reaped, so connections still open at the drain deadline leave nothing behind.
//!
//! Places other than the configuration's own are recorded in the [`Ledger`] before their
//! first container is started, so a run that ends without the shutdown reap (killed, crashed)
//! has them reaped at the next start ([`Janitor::start_up`]).
//!
//! Bounded: at most [`MAX_PENDING_REMOVALS`] removals wait (beyond, the removal is logged and
//! left to the start-up reaper), and at most [`MAX_PLACES`] places are remembered for the
//! shutdown reap. Each attempt is bounded by [`ATTEMPT_TIMEOUT`], the shutdown's work by
//! [`FINISH_TIMEOUT`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ledger::{Ledger, Record};
use super::{one_line, Backend};

/// Removals waiting for a retry.
pub const MAX_PENDING_REMOVALS: usize = 4096;
/// Places (engines, clusters and namespaces) remembered for the shutdown reap.
pub const MAX_PLACES: usize = 64;
/// The first retry's delay; each failure doubles it, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One removal or reap attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The last round at shutdown, all of it.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

struct Pending {
    backend: Arc<dyn Backend>,
    connection_id: String,
    due: Instant,
    backoff: Duration,
    attempts: u32,
}

/// Retries failed removals and remembers where this run created containers or pods.
pub struct Janitor {
    pending: Mutex<Vec<Pending>>,
    wake: Notify,
    stop: CancellationToken,
    places: Mutex<Vec<(String, Arc<dyn Backend>)>>,
    ledger: Option<Ledger>,
}

/// A place a previous run recorded, with a backend built for it.
pub type Leftover = (String, Arc<dyn Backend>);

impl Janitor {
    /// `place` names where `backend` (the configuration's) creates containers or pods
    /// ([`super::build::place`]); `leftovers`: the places a previous run recorded in
    /// `ledger`, reaped by [`Self::start_up`].
    pub fn new(
        place: String,
        backend: Arc<dyn Backend>,
        ledger: Option<Ledger>,
        leftovers: Vec<Leftover>,
    ) -> Self {
        let mut places = vec![(place, backend)];
        for (place, backend) in leftovers {
            // One the configuration names now is reaped as the configuration's.
            if places.len() < MAX_PLACES && places.iter().all(|(p, _)| *p != place) {
                places.push((place, backend));
            }
        }
        Self {
            pending: Mutex::new(Vec::new()),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            places: Mutex::new(places),
            ledger,
        }
    }

    /// Remembers a login's own backend for the shutdown reap, and records its place in the
    /// ledger for the next start (`block`: what rebuilds it; [`super::build::record`]). Once
    /// per place; called before the login's container is started.
    pub fn track(&self, place: String, backend: &Arc<dyn Backend>, block: serde_json::Value) {
        let mut places = self.places.lock().unwrap_or_else(PoisonError::into_inner);
        if places.iter().any(|(p, _)| *p == place) {
            return;
        }
        if places.len() >= MAX_PLACES {
            tracing::warn!(code = "BACKEND_PLACE_NOT_TRACKED", %place, limit = MAX_PLACES, "too many engines or clusters in use: this one is not reaped at shutdown or at the next start");
            return;
        }
        places.push((place.clone(), Arc::clone(backend)));
        drop(places);
        let recorded = self.ledger.as_ref().is_some_and(|l| {
            l.add(Record {
                place: place.clone(),
                block,
            })
        });
        if !recorded {
            tracing::warn!(code = "BACKEND_PLACE_NOT_RECORDED", %place, "not recorded in the janitor's ledger: what a crash leaves here is not reaped at the next start");
        }
    }

    /// At start: reaps every place — the configuration's, and those a previous run
    /// recorded (forgotten once reaped).
    pub async fn start_up(&self) {
        for (i, (place, backend)) in self.places().into_iter().enumerate() {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, backend.reap()).await {
                Ok(Ok(n)) => {
                    if n > 0 {
                        tracing::warn!(code = "BACKEND_LEFTOVERS_REMOVED", %place, removed = n, "removed containers or pods a previous run of this instance left behind");
                    }
                    if let Some(l) = &self.ledger {
                        l.remove(&place);
                    }
                    if i > 0 {
                        self.forget(&place);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(code = "BACKEND_REAP_FAILED", %place, error = %one_line(e.as_ref()), "start-up cleanup failed (is the Docker engine or the Kubernetes API reachable?); logins will fail until it answers")
                }
                Err(_) => {
                    tracing::warn!(code = "BACKEND_REAP_FAILED", %place, "start-up cleanup timed out (is the Docker engine or the Kubernetes API reachable?)")
                }
            }
        }
    }

    fn places(&self) -> Vec<(String, Arc<dyn Backend>)> {
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A place reaped with nothing left there: out of the ledger and of the shutdown reap
    /// (until a login uses it again).
    fn forget(&self, place: &str) {
        if let Some(l) = &self.ledger {
            l.remove(place);
        }
        self.places
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(p, _)| p != place);
    }

    /// Removes one connection's containers or pods; when the engine does not answer, the
    /// removal is retried in the background.
    pub async fn remove_connection(&self, backend: &Arc<dyn Backend>, connection_id: &str) {
        let error = match attempt(backend, connection_id).await {
            Ok(n) => {
                tracing::debug!(connection_id, removed = n, "connection cleaned up");
                return;
            }
            Err(e) => e,
        };
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= MAX_PENDING_REMOVALS {
            tracing::error!(code = "BACKEND_CLEANUP_FAILED", connection_id, %error, limit = MAX_PENDING_REMOVALS, "cannot remove containers, and too many removals wait already: the reaper will remove them at the next start");
            return;
        }
        tracing::warn!(code = "BACKEND_CLEANUP_RETRY", connection_id, %error, "cannot remove containers: retrying in the background");
        pending.push(Pending {
            backend: Arc::clone(backend),
            connection_id: connection_id.to_owned(),
            due: Instant::now() + FIRST_BACKOFF,
            backoff: FIRST_BACKOFF,
            attempts: 1,
        });
        drop(pending);
        self.wake.notify_one();
    }

    /// How many removals wait for a retry.
    pub fn pending(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The retry loop, until [`Self::finish`].
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = self
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|p| p.due)
                .min();
            let wait = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.wake.notified() => continue,
                () = wait => {}
            }
            let due = self.take(|p| p.due <= Instant::now());
            for mut p in due {
                match attempt(&p.backend, &p.connection_id).await {
                    Ok(n) => tracing::info!(
                        code = "BACKEND_CLEANUP_DONE",
                        connection_id = %p.connection_id,
                        removed = n,
                        attempts = p.attempts + 1,
                        "connection cleaned up: the engine answers again"
                    ),
                    Err(e) => {
                        p.attempts += 1;
                        p.backoff = (p.backoff * 2).min(MAX_BACKOFF);
                        p.due = Instant::now() + p.backoff;
                        tracing::debug!(connection_id = %p.connection_id, error = %e, retry_in = ?p.backoff, "removal failed again");
                        self.pending
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(p);
                    }
                }
            }
        }
    }

    fn take(&self, due: impl Fn(&Pending) -> bool) -> Vec<Pending> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let (now, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|p| due(p));
        *pending = later;
        now
    }

    /// At shutdown, after the drain (`drained`: every connection is gone): stops the retry
    /// loop, then a last attempt at every pending removal and a reap of every place this run
    /// used, bounded by [`FINISH_TIMEOUT`]. A place reaped after a complete drain leaves the
    /// ledger; otherwise the next start reaps it again.
    pub async fn finish(&self, drained: bool) {
        self.stop.cancel();
        let work = async {
            for p in self.take(|_| true) {
                if let Err(e) = attempt(&p.backend, &p.connection_id).await {
                    tracing::error!(code = "BACKEND_CLEANUP_FAILED", connection_id = %p.connection_id, error = %e, "cannot remove containers at shutdown: the reaper will remove them at the next start");
                }
            }
            for (place, backend) in self.places() {
                match tokio::time::timeout(ATTEMPT_TIMEOUT, backend.reap()).await {
                    Ok(Ok(n)) => {
                        if n > 0 {
                            tracing::info!(code = "BACKEND_SHUTDOWN_REAPED", %place, removed = n, "removed what connections still open at the drain deadline left");
                        }
                        if drained {
                            self.forget(&place);
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(code = "BACKEND_REAP_FAILED", %place, error = %one_line(e.as_ref()), "cleanup at shutdown failed: the next start reaps it")
                    }
                    Err(_) => {
                        tracing::error!(code = "BACKEND_REAP_FAILED", %place, "cleanup at shutdown timed out")
                    }
                }
            }
        };
        if tokio::time::timeout(FINISH_TIMEOUT, work).await.is_err() {
            tracing::error!(
                code = "BACKEND_CLEANUP_TIMEOUT",
                "cleanup at shutdown did not finish in time"
            );
        }
    }
}

/// One removal, bounded; the error on one line with its causes.
async fn attempt(backend: &Arc<dyn Backend>, connection_id: &str) -> Result<usize, String> {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, backend.remove_connection(connection_id)).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(one_line(e.as_ref())),
        Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{echo, FakeBackend, FakeEvent};
    use crate::config::model::ExecutionMode;

    fn new_fake() -> (FakeBackend, Arc<dyn Backend>) {
        let fake = FakeBackend::new(ExecutionMode::Connection, |_| echo());
        let backend: Arc<dyn Backend> = Arc::new(fake.clone());
        (fake, backend)
    }

    fn removed(fake: &FakeBackend) -> Vec<String> {
        fake.events()
            .into_iter()
            .filter_map(|e| match e {
                FakeEvent::RemovedConnection(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_removal_that_fails_is_retried_once_the_engine_answers() {
        let (fake, backend) = new_fake();
        let janitor = Arc::new(Janitor::new(
            "here".into(),
            Arc::clone(&backend),
            None,
            Vec::new(),
        ));
        tokio::spawn(Arc::clone(&janitor).run());
        fake.set_unreachable(true);
        for id in ["c1", "c2", "c3"] {
            janitor.remove_connection(&backend, id).await;
        }
        assert_eq!(janitor.pending(), 3);
        // The engine stays away for 3 s: the retries at 1 s and 3 s fail.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(janitor.pending(), 3);
        assert!(removed(&fake).is_empty());
        fake.set_unreachable(false);
        // The next retry (backoff 4 s, at 7 s) removes all three.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(janitor.pending(), 0);
        assert_eq!(removed(&fake), ["c1", "c2", "c3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_is_capped_and_the_queue_bounded() {
        let (fake, backend) = new_fake();
        let janitor = Arc::new(Janitor::new(
            "here".into(),
            Arc::clone(&backend),
            None,
            Vec::new(),
        ));
        tokio::spawn(Arc::clone(&janitor).run());
        fake.set_unreachable(true);
        janitor.remove_connection(&backend, "c1").await;
        // An hour down: retries keep going at most MAX_BACKOFF apart.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        fake.set_unreachable(false);
        tokio::time::sleep(MAX_BACKOFF + Duration::from_millis(1)).await;
        assert_eq!(removed(&fake), ["c1"]);

        fake.set_unreachable(true);
        for i in 0..MAX_PENDING_REMOVALS + 10 {
            janitor.remove_connection(&backend, &format!("x{i}")).await;
        }
        assert_eq!(janitor.pending(), MAX_PENDING_REMOVALS);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_retries_what_waits_and_reaps_every_place() {
        let (fake, backend) = new_fake();
        let (other, other_backend) = new_fake();
        let janitor = Arc::new(Janitor::new(
            "here".into(),
            Arc::clone(&backend),
            None,
            Vec::new(),
        ));
        let run = tokio::spawn(Arc::clone(&janitor).run());
        janitor.track("there".into(), &other_backend, serde_json::Value::Null);
        janitor.track("there".into(), &other_backend, serde_json::Value::Null);
        fake.set_unreachable(true);
        janitor.remove_connection(&backend, "c1").await;
        fake.set_unreachable(false);
        janitor.finish(true).await;
        run.await.unwrap();
        assert_eq!(removed(&fake), ["c1"]);
        let reaps = |f: &FakeBackend| {
            f.events()
                .iter()
                .filter(|e| **e == FakeEvent::Reaped)
                .count()
        };
        assert_eq!((reaps(&fake), reaps(&other)), (1, 1));
    }
}
