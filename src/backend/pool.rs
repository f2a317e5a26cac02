//! The warm pool (`docker.execution.pool`): containers started ahead from the configuration,
//! with nothing of any user in them, each **claimed** by one login whose container would be
//! identical (same create request but for our per-connection labels) and removed after that
//! login's connection, never returned. Other logins start cold.
//!
//! A background task keeps `size` members ready, starting at most [`MAX_PARALLEL_STARTS`] at a
//! time (a burst of logins keeps the engine's capacity for itself), and replaces members older
//! than `maxAge`. A member that died while waiting (OOM, `docker kill`) is found at its claim,
//! removed, and the login starts cold. Members carry the instance label, so the start-up and
//! shutdown reapers remove them like every other container of the instance; a claimed member
//! keeps its pool labels (Docker's labels are fixed at create), so the claim's connection and
//! user are logged (`BACKEND_POOL_CLAIM`) and kept here until the connection's cleanup removes
//! it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::StartError;

/// Marks the pool's members while they wait (they carry no connection or user label).
pub const LABEL_POOL: &str = "containerssh_pool";
/// Members started at once while refilling.
pub const MAX_PARALLEL_STARTS: usize = 4;
/// The largest pool a configuration may ask for.
pub const MAX_POOL_SIZE: u32 = 1000;
/// How long a refill waits after a failed start before trying again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Checks a backend's `pool` block: `(key under the pool, message)` for what is wrong.
/// `named`: the configuration names the one container or pod, which members cannot share.
pub fn check_config(
    pool: &crate::config::model::PoolConfig,
    mode: crate::config::model::ExecutionMode,
    named: bool,
) -> Result<(), (&'static str, String)> {
    if pool.size == 0 {
        return Ok(());
    }
    if mode != crate::config::model::ExecutionMode::Connection {
        return Err(("size", "a pool serves connection mode only (session containers run the program itself; a persistent container is one)".into()));
    }
    if named {
        return Err(("size", "pool members cannot share one name".into()));
    }
    if pool.size > MAX_POOL_SIZE {
        return Err(("size", format!("at most {MAX_POOL_SIZE}")));
    }
    if pool.max_age.0.is_zero() {
        return Err(("maxAge", "must be positive".into()));
    }
    Ok(())
}

/// What a runtime does for its pool.
pub trait Members: Send + Sync + 'static {
    /// Starts one member from the configuration alone; its id.
    fn start_member(&self) -> impl Future<Output = Result<String, StartError>> + Send;
    /// Whether a member still runs.
    fn member_alive(&self, id: &str) -> impl Future<Output = bool> + Send;
    /// Removes a member (too old, dead, or its connection is over); whether it is gone.
    fn remove_member(&self, id: &str) -> impl Future<Output = bool> + Send;
}

struct Ready {
    id: String,
    started: Instant,
}

/// One pool: its members and claims.
pub struct Pool {
    size: usize,
    max_age: Duration,
    /// What a login's container must be to take a member (the runtime's create request
    /// without per-connection labels).
    identity: String,
    ready: Mutex<VecDeque<Ready>>,
    /// Claimed members by connection id, until the connection's cleanup removed them.
    claimed: Mutex<HashMap<String, String>>,
    /// Members too old or dead, for the refill task to remove.
    discard: Mutex<Vec<String>>,
    /// Wakes the refill task (a claim, a discard).
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    pub fn new(size: u32, max_age: Duration, identity: String) -> Arc<Self> {
        Arc::new(Self {
            size: size.min(MAX_POOL_SIZE) as usize,
            max_age,
            identity,
            ready: Mutex::new(VecDeque::new()),
            claimed: Mutex::new(HashMap::new()),
            discard: Mutex::new(Vec::new()),
            wake: Notify::new(),
        })
    }

    /// Members ready now.
    pub fn ready(&self) -> usize {
        lock(&self.ready).len()
    }

    /// A member whose container would be `identity`, recorded at once as `connection_id`'s
    /// claim (so that it is never outside both the ready list and the claims, whatever
    /// happens to the caller); `None`: start cold. The member is checked alive by the caller
    /// ([`Pool::claim_checked`] does both).
    fn take(&self, identity: &str, connection_id: &str) -> Option<String> {
        if identity != self.identity {
            return None;
        }
        let mut ready = lock(&self.ready);
        let mut discard = lock(&self.discard);
        let mut taken = None;
        while let Some(m) = ready.pop_front() {
            crate::metrics::get().pool_ready.dec(&[]);
            if m.started.elapsed() >= self.max_age {
                discard.push(m.id);
                continue;
            }
            lock(&self.claimed).insert(connection_id.to_string(), m.id.clone());
            taken = Some(m.id);
            break;
        }
        drop(discard);
        drop(ready);
        self.wake.notify_one();
        taken
    }

    /// Gives a taken member up: it is removed by the refill task, not by the connection's
    /// cleanup.
    fn give_up(&self, connection_id: &str, id: &str) {
        let mut claimed = lock(&self.claimed);
        if claimed.get(connection_id).is_some_and(|c| c == id) {
            claimed.remove(connection_id);
        }
        drop(claimed);
        lock(&self.discard).push(id.to_string());
        self.wake.notify_one();
    }

    /// Claims a live member for `connection_id` (a dead one is discarded and the next tried),
    /// counted in `containerssh_pool_logins_total`. Dropped while checking (the login gave
    /// up), the member it was checking is discarded.
    pub async fn claim_checked<R: Members>(
        &self,
        rt: &R,
        identity: &str,
        connection_id: &str,
    ) -> Option<String> {
        let claimed = self.claim_live(rt, identity, connection_id).await;
        let result = if claimed.is_some() { "claimed" } else { "cold" };
        crate::metrics::get().pool_logins.inc(&[result]);
        claimed
    }

    async fn claim_live<R: Members>(
        &self,
        rt: &R,
        identity: &str,
        connection_id: &str,
    ) -> Option<String> {
        struct Checking<'a> {
            pool: &'a Pool,
            connection_id: &'a str,
            id: Option<String>,
        }
        impl Drop for Checking<'_> {
            fn drop(&mut self) {
                if let Some(id) = self.id.take() {
                    self.pool.give_up(self.connection_id, &id);
                }
            }
        }
        while let Some(id) = self.take(identity, connection_id) {
            let mut checking = Checking {
                pool: self,
                connection_id,
                id: Some(id.clone()),
            };
            if rt.member_alive(&id).await {
                checking.id = None;
                return Some(id);
            }
            tracing::warn!(code = "BACKEND_POOL_MEMBER_DEAD", container = %id, "a pool member died while waiting: removed, the login starts another");
        }
        None
    }

    /// The member `connection_id` claimed, if any (for its cleanup).
    pub fn claimed_by(&self, connection_id: &str) -> Option<String> {
        lock(&self.claimed).get(connection_id).cloned()
    }

    /// The connection's member is removed.
    pub fn released(&self, connection_id: &str) {
        lock(&self.claimed).remove(connection_id);
    }

    /// Keeps the pool filled until `stop`; then leaves the members to the shutdown reaper.
    pub async fn run<R: Members>(self: Arc<Self>, rt: Arc<R>, stop: CancellationToken) {
        let mut starting = tokio::task::JoinSet::new();
        loop {
            let old: Vec<String> = {
                let mut ready = lock(&self.ready);
                let (keep, old): (VecDeque<Ready>, VecDeque<Ready>) = ready
                    .drain(..)
                    .partition(|m| m.started.elapsed() < self.max_age);
                *ready = keep;
                for _ in &old {
                    crate::metrics::get().pool_ready.dec(&[]);
                }
                old.into_iter().map(|m| m.id).collect()
            };
            let discard: Vec<String> = std::mem::take(&mut *lock(&self.discard));
            for id in old.into_iter().chain(discard) {
                let rt = Arc::clone(&rt);
                tokio::spawn(async move {
                    rt.remove_member(&id).await;
                });
            }
            while lock(&self.ready).len() + starting.len() < self.size
                && starting.len() < MAX_PARALLEL_STARTS
            {
                let rt = Arc::clone(&rt);
                starting.spawn(async move { rt.start_member().await });
            }
            // The next member to expire, to replace it in time (kept members have time left).
            let next_expiry = lock(&self.ready)
                .front()
                .map(|m| self.max_age.saturating_sub(m.started.elapsed()))
                .unwrap_or(self.max_age);
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(next_expiry) => {}
                Some(done) = starting.join_next(), if !starting.is_empty() => {
                    match done {
                        Ok(Ok(id)) => {
                            if stop.is_cancelled() {
                                rt.remove_member(&id).await;
                                break;
                            }
                            lock(&self.ready).push_back(Ready { id, started: Instant::now() });
                            crate::metrics::get().pool_ready.inc(&[]);
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(code = "BACKEND_POOL_START_FAILED", error = %super::one_line(&e), "a pool member could not be started: trying again shortly");
                            tokio::select! {
                                () = stop.cancelled() => break,
                                () = tokio::time::sleep(RETRY_AFTER_FAILURE) => {}
                            }
                        }
                        Err(e) => tracing::warn!(code = "BACKEND_POOL_START_FAILED", error = %e, "a pool member's start ended abnormally"),
                    }
                }
            }
        }
        starting.abort_all();
        // What waits now is the shutdown reaper's.
        let left = std::mem::take(&mut *lock(&self.ready));
        for _ in &left {
            crate::metrics::get().pool_ready.dec(&[]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counting {
        started: AtomicUsize,
        removed: Mutex<Vec<String>>,
        dead: Mutex<Vec<String>>,
        /// Checks never answer.
        stall: std::sync::atomic::AtomicBool,
    }

    impl Members for Counting {
        async fn start_member(&self) -> Result<String, StartError> {
            Ok(format!("m{}", self.started.fetch_add(1, Ordering::SeqCst)))
        }
        async fn member_alive(&self, id: &str) -> bool {
            if self.stall.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            !lock(&self.dead).iter().any(|d| d == id)
        }
        async fn remove_member(&self, id: &str) -> bool {
            lock(&self.removed).push(id.to_string());
            true
        }
    }

    async fn until(what: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if what() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never");
    }

    /// Filled to its size; a claim needs the same identity, takes a live member once, and
    /// the pool refills; a dead member is discarded and the next one taken.
    #[tokio::test(flavor = "current_thread")]
    async fn members_are_claimed_once_checked_and_refilled() {
        let rt = Arc::new(Counting::default());
        let pool = Pool::new(3, Duration::from_secs(600), "same".into());
        let stop = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&pool).run(Arc::clone(&rt), stop.clone()));
        until(|| pool.ready() == 3).await;
        assert_eq!(pool.claim_checked(&*rt, "other", "c0").await, None);
        assert_eq!(pool.ready(), 3, "another identity takes nothing");
        let first = pool.claim_checked(&*rt, "same", "c1").await.unwrap();
        assert_eq!(pool.claimed_by("c1"), Some(first.clone()));
        until(|| pool.ready() == 3 && rt.started.load(Ordering::SeqCst) == 4).await;
        // The next in line died: discarded and removed; the claim gets the one after.
        let next = lock(&pool.ready).front().unwrap().id.clone();
        lock(&rt.dead).push(next.clone());
        let second = pool.claim_checked(&*rt, "same", "c2").await.unwrap();
        assert_ne!(second, next);
        assert_ne!(second, first);
        until(|| lock(&rt.removed).contains(&next)).await;
        pool.released("c1");
        assert_eq!(pool.claimed_by("c1"), None);
        stop.cancel();
        task.await.unwrap();
    }

    /// A login that gives up while its member is checked leaves no claim behind and the
    /// member goes: it is removed by the refill task, never handed to another login.
    #[tokio::test(flavor = "current_thread")]
    async fn a_claim_dropped_while_checking_discards_its_member() {
        let rt = Arc::new(Counting::default());
        rt.stall.store(true, Ordering::SeqCst);
        let pool = Pool::new(1, Duration::from_secs(600), "same".into());
        let stop = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&pool).run(Arc::clone(&rt), stop.clone()));
        until(|| pool.ready() == 1).await;
        {
            let claim = pool.claim_checked(&*rt, "same", "c1");
            tokio::pin!(claim);
            let polled = tokio::time::timeout(Duration::from_millis(1), claim.as_mut()).await;
            assert!(polled.is_err(), "the check never answers");
            // While checked, the member is the connection's: its cleanup would remove it.
            assert_eq!(pool.claimed_by("c1").as_deref(), Some("m0"));
        }
        assert_eq!(pool.claimed_by("c1"), None);
        until(|| lock(&rt.removed).contains(&"m0".to_string())).await;
        until(|| pool.ready() == 1).await;
        assert_ne!(lock(&pool.ready).front().unwrap().id, "m0");
        stop.cancel();
        task.await.unwrap();
    }

    /// Members older than maxAge are not handed out, and are replaced.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn old_members_are_replaced() {
        let rt = Arc::new(Counting::default());
        let pool = Pool::new(1, Duration::from_secs(10), "same".into());
        let stop = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&pool).run(Arc::clone(&rt), stop.clone()));
        until(|| pool.ready() == 1).await;
        tokio::time::sleep(Duration::from_secs(11)).await;
        until(|| lock(&rt.removed).contains(&"m0".to_string()) && pool.ready() == 1).await;
        assert_eq!(
            pool.claim_checked(&*rt, "same", "c").await.as_deref(),
            Some("m1")
        );
        stop.cancel();
        task.await.unwrap();
    }
}
