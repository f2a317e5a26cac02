//! What clients send, bounded: channel windows granted as consumers drain them, out of byte
//! budgets per connection and for the whole server.
//!
//! russh runs with manual window adjustment (vendor patch 0002): data only uses up a
//! channel's window, and the window is granted again here, by the task that delivers the
//! data, once it has been delivered. A channel whose program does not read stops its own
//! client at its window; the connection's reader never waits, so its other channels,
//! keepalives and rekeying carry on. russh ends a connection that sends beyond a window.
//!
//! Every byte a client may send before its consumer takes it is reserved beforehand: a
//! channel holds its outstanding window plus what it has received and not delivered, never
//! more than [`CHANNEL_WINDOW_MAX`]. Reservations come from the connection's [`Budget`],
//! which takes them from the server's: what exceeds them is not granted (the client waits
//! for window) or, for a new channel that cannot get its first window, refused.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use russh::server::Handle;
use russh::ChannelId;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::limits::{CHANNEL_WINDOW_INITIAL, CHANNEL_WINDOW_MAX, MIN_WINDOW_GRANT};

/// Bytes that holders (channels) may reserve together: a connection's, whose reservations
/// are also taken from its parent, the server's.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    parent: Option<Arc<Budget>>,
    /// Woken when bytes are given back, for holders that got nothing.
    freed: Notify,
}

impl Budget {
    /// The server's budget.
    pub fn total(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            parent: None,
            freed: Notify::new(),
        })
    }

    /// A connection's budget, drawing on `self`.
    pub fn child(self: &Arc<Self>, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            parent: Some(Arc::clone(self)),
            freed: Notify::new(),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Reserves as much of `want` as this budget and its parent allow, or nothing when that
    /// is less than `min` (or nothing at all); returns what was reserved.
    pub fn take(&self, min: usize, want: usize) -> usize {
        let mut got = 0;
        let reserved = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                got = want.min(self.limit.saturating_sub(used));
                (got > 0 && got >= min).then_some(used + got)
            });
        if reserved.is_err() {
            return 0;
        }
        let Some(parent) = &self.parent else {
            return got;
        };
        let from_parent = parent.take(min, got);
        if from_parent < got {
            self.used.fetch_sub(got - from_parent, Ordering::AcqRel);
        }
        from_parent
    }

    /// Gives `n` reserved bytes back, here and in the parent.
    pub fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
        if let Some(parent) = &self.parent {
            parent.give(n);
        }
        self.freed.notify_waiters();
    }

    /// Resolves when bytes are given back to this budget or to its parent, from the moment
    /// of the call on: `enable`d at once, so a give racing with the caller's last look at
    /// the budget is not missed.
    fn freed(&self) -> impl std::future::Future<Output = ()> + '_ {
        let own = self.freed.notified();
        let parent = self.parent.as_ref().map(|p| p.freed.notified());
        let mut own = Box::pin(own);
        let mut parent = parent.map(Box::pin);
        own.as_mut().enable();
        if let Some(p) = parent.as_mut() {
            p.as_mut().enable();
        }
        async move {
            match parent {
                Some(p) => tokio::select! {
                    () = own => {}
                    () = p => {}
                },
                None => own.await,
            }
        }
    }
}

/// Why a channel could not be given its first window.
#[derive(Debug, thiserror::Error)]
#[error("buffer budget exhausted ({used} of {limit} bytes reserved by this connection)")]
pub struct BudgetExhausted {
    pub used: usize,
    pub limit: usize,
}

/// Sends window grants for one channel.
#[derive(Clone)]
pub struct Granter {
    handle: Handle,
    id: ChannelId,
}

impl Granter {
    pub fn new(handle: Handle, id: ChannelId) -> Self {
        Self { handle, id }
    }

    fn grant(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        // Fails only when the session is gone, and then nobody is sending.
        let _ = self.handle.window_adjust(self.id, n);
    }
}

struct State {
    queue: VecDeque<Bytes>,
    eof: bool,
    /// The consumer is gone: data is discarded (and its window given back at once).
    discarding: bool,
    /// Window the client may still use.
    outstanding: usize,
    /// Received and not yet delivered.
    queued: usize,
    /// What `outstanding + queued` is topped up to: it starts at the first window and doubles
    /// with each top-up, up to [`CHANNEL_WINDOW_MAX`], so only channels in use grow.
    target: usize,
    /// Where grants go, once the channel's id is known to us.
    granter: Option<Granter>,
}

/// One channel's inbound flow, shared by the SSH side ([`InboundTx`]) and the task that
/// delivers the data ([`InboundRx`]).
struct Inbound {
    state: Mutex<State>,
    readable: Notify,
    budget: Arc<Budget>,
}

/// The SSH side: the handler queues what russh hands it (never more than the window).
pub struct InboundTx(Arc<Inbound>);

/// The consumer side. Dropping it discards further data, as a closed pipe would, and keeps
/// the client's window open so it can go on to its EOF.
pub struct InboundRx(Arc<Inbound>);

impl Inbound {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tops the window up once the client has used half of its target, as far as the
    /// budget allows, and doubles the target (up to [`CHANNEL_WINDOW_MAX`]); grants nothing
    /// below [`MIN_WINDOW_GRANT`] unless the client has no window at all. `true` when
    /// something was granted.
    fn top_up(&self, st: &mut State) -> bool {
        let Some(granter) = st.granter.clone() else {
            return false;
        };
        let held = st.outstanding + st.queued;
        if st.outstanding >= st.target / 2 || held >= st.target {
            return false;
        }
        let min = if st.outstanding == 0 {
            1
        } else {
            MIN_WINDOW_GRANT
        };
        let got = self.budget.take(min, st.target - held);
        if got == 0 {
            return false;
        }
        st.outstanding += got;
        st.target = (st.target * 2).min(CHANNEL_WINDOW_MAX);
        granter.grant(got);
        true
    }

    /// `n` bytes have left: their reservation goes back to the budget, and the window is
    /// topped up.
    fn delivered(&self, st: &mut State, n: usize) {
        st.queued -= n;
        self.budget.give(n);
        self.top_up(st);
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        let st = self.lock();
        let held = st.outstanding + st.queued;
        drop(st);
        self.budget.give(held);
    }
}

/// A new channel's flow with its first window ([`CHANNEL_WINDOW_INITIAL`], what russh
/// offers every channel) reserved from `budget`.
pub fn inbound(budget: &Arc<Budget>) -> Result<(InboundTx, InboundRx), BudgetExhausted> {
    if budget.take(CHANNEL_WINDOW_INITIAL, CHANNEL_WINDOW_INITIAL) == 0 {
        return Err(BudgetExhausted {
            used: budget.used(),
            limit: budget.limit(),
        });
    }
    Ok(inbound_reserved(budget))
}

/// [`inbound`] for a first window that was reserved from `budget` beforehand (a channel we
/// open towards the client reserves it before the open).
pub fn inbound_reserved(budget: &Arc<Budget>) -> (InboundTx, InboundRx) {
    let flow = Arc::new(Inbound {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            eof: false,
            discarding: false,
            outstanding: CHANNEL_WINDOW_INITIAL,
            queued: 0,
            target: CHANNEL_WINDOW_INITIAL,
            granter: None,
        }),
        readable: Notify::new(),
        budget: Arc::clone(budget),
    });
    (InboundTx(Arc::clone(&flow)), InboundRx(flow))
}

impl InboundTx {
    /// Where window grants go (set when the channel's id and session handle are known).
    pub fn set_granter(&self, granter: Granter) {
        let flow = &self.0;
        let mut st = flow.lock();
        st.granter = Some(granter);
        // Data may have been delivered before: grant what it freed.
        flow.top_up(&mut st);
    }

    /// Queues data russh received (within the window it enforces). Never waits.
    pub fn push(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let flow = &self.0;
        let mut st = flow.lock();
        // russh refuses data beyond the window; a mismatch here would be ours, so count
        // what arrived rather than trust the difference.
        st.outstanding = st.outstanding.saturating_sub(data.len());
        st.queued += data.len();
        if st.eof || st.discarding {
            flow.delivered(&mut st, data.len());
            return;
        }
        st.queue.push_back(Bytes::copy_from_slice(data));
        drop(st);
        flow.readable.notify_one();
    }

    /// No more data: the consumer sees the end once it has taken what is queued.
    pub fn eof(&self) {
        let flow = &self.0;
        flow.lock().eof = true;
        flow.readable.notify_one();
    }
}

impl InboundRx {
    /// The next chunk, `None` at EOF. Call [`Self::delivered`] with its length once it has
    /// been passed on. A channel that could not be given any window waits here for the budget
    /// to free some.
    pub async fn next(&mut self) -> Option<Bytes> {
        let flow = &self.0;
        loop {
            let readable = flow.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            let starved = {
                let mut st = flow.lock();
                if let Some(chunk) = st.queue.pop_front() {
                    return Some(chunk);
                }
                if st.eof {
                    return None;
                }
                st.outstanding == 0 && st.granter.is_some() && !flow.top_up(&mut st)
            };
            if !starved {
                readable.await;
                continue;
            }
            // No window and nothing reserved to give: wait for the budget. Look once more
            // after the wait is armed, so a give in between is not missed.
            let freed = flow.budget.freed();
            if flow.top_up(&mut flow.lock()) {
                continue;
            }
            tokio::select! {
                () = &mut readable => {}
                () = freed => {}
            }
        }
    }

    /// `n` bytes of what [`Self::next`] returned have been passed on.
    pub fn delivered(&self, n: usize) {
        let flow = &self.0;
        let mut st = flow.lock();
        flow.delivered(&mut st, n);
    }

    /// Copies the data into `writer` until EOF (then half-closes it) or a write fails;
    /// `seen` is shown each chunk as it is delivered (the audit recording's stdin).
    pub async fn pump<W: AsyncWrite + Unpin>(mut self, mut writer: W, mut seen: impl FnMut(&[u8])) {
        while let Some(chunk) = self.next().await {
            seen(&chunk);
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
            self.delivered(chunk.len());
        }
        // Half-close: the program sees EOF and can still write its output.
        let _ = writer.shutdown().await;
    }
}

impl Drop for InboundRx {
    fn drop(&mut self) {
        let flow = &self.0;
        let mut st = flow.lock();
        st.discarding = true;
        let queued: usize = st.queue.drain(..).map(|b| b.len()).sum();
        flow.delivered(&mut st, queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_nest_and_refuse_below_the_minimum() {
        let total = Budget::total(100);
        let a = total.child(80);
        let b = total.child(80);
        assert_eq!(a.take(10, 70), 70);
        // b's own limit would allow 80, the total only 30.
        assert_eq!(b.take(10, 80), 30);
        assert_eq!(b.used(), 30);
        assert_eq!(total.used(), 100);
        assert_eq!(a.take(1, 5), 0);
        a.give(70);
        assert_eq!(total.used(), 30);
        assert_eq!(b.take(60, 60), 0, "b's own limit leaves 50");
        assert_eq!(b.take(50, 60), 50);
    }

    #[tokio::test]
    async fn a_channel_holds_its_window_and_gives_it_back() {
        let total = Budget::total(16 * 1024 * 1024);
        let conn = total.child(8 * 1024 * 1024);
        let (tx, mut rx) = inbound(&conn).unwrap();
        assert_eq!(conn.used(), CHANNEL_WINDOW_INITIAL);
        tx.push(&[1u8; 1000]);
        tx.eof();
        assert_eq!(rx.next().await.unwrap().len(), 1000);
        rx.delivered(1000);
        // No session to grant through: nothing more is reserved.
        assert_eq!(conn.used(), CHANNEL_WINDOW_INITIAL - 1000);
        assert!(rx.next().await.is_none());
        drop((tx, rx));
        assert_eq!(conn.used(), 0);
        assert_eq!(total.used(), 0);
    }

    #[test]
    fn a_new_channel_needs_its_whole_first_window() {
        let total = Budget::total(CHANNEL_WINDOW_INITIAL + 10);
        let first = inbound(&total.child(usize::MAX)).unwrap();
        assert!(inbound(&total.child(usize::MAX)).is_err());
        drop(first);
        assert!(inbound(&total.child(usize::MAX)).is_ok());
    }

    #[tokio::test]
    async fn data_for_a_gone_consumer_is_discarded_and_its_reservation_freed() {
        let conn = Budget::total(usize::MAX);
        let (tx, rx) = inbound(&conn).unwrap();
        tx.push(&[0u8; 500]);
        drop(rx);
        assert_eq!(conn.used(), CHANNEL_WINDOW_INITIAL - 500);
        tx.push(&[0u8; 500]);
        assert_eq!(conn.used(), CHANNEL_WINDOW_INITIAL - 1000);
    }
}
