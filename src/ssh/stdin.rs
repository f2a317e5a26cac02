//! A channel's stdin queue, and why it is shaped this way.
//!
//! russh grants the client more window as soon as data arrives, not when the program has
//! consumed it, so the only way to slow a client down is to stop reading the connection. That
//! is safe while the program is the bottleneck. It deadlocks when the program is blocked
//! writing output that waits for the client's window, because the client's window updates are
//! on the connection we stopped reading (think `cat` echoing a large upload).
//!
//! So the reader waits only when the queue holds [`MAX_STDIN_BUFFER_BYTES`] *and* the
//! channel's output is not itself waiting on the client. While output is waiting, data is
//! accepted beyond the soft limit up to [`MAX_STDIN_OVERFLOW_BYTES`]; a client that fills even
//! that is sending without reading and is disconnected.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify, Semaphore, TryAcquireError};

use crate::limits::{
    MAX_FORWARD_BUFFER_BYTES, MAX_FORWARD_OVERFLOW_BYTES, MAX_STDIN_BUFFER_BYTES,
    MAX_STDIN_OVERFLOW_BYTES,
};

enum StdinMsg {
    Data(Bytes),
    Eof,
}

/// Shared between the SSH reader, the stdin pump and the output pump.
struct Flow {
    budget: Semaphore,
    /// Bytes accepted beyond the budget while output was blocked on the client.
    overflow: AtomicUsize,
    /// The output pump is waiting for the client (window or session queue).
    output_blocked: AtomicBool,
    output_blocked_changed: Notify,
    eof_sent: AtomicBool,
    /// The budget's size and the overflow's limit.
    soft: usize,
    hard: usize,
}

/// The SSH side of the queue.
pub struct StdinTx {
    tx: mpsc::UnboundedSender<StdinMsg>,
    flow: Arc<Flow>,
}

/// The program side; dropping it discards further input, as a closed pipe would.
pub struct StdinRx {
    rx: mpsc::UnboundedReceiver<StdinMsg>,
    flow: Arc<Flow>,
}

/// Lets the output pump say when it is waiting on the client.
#[derive(Clone)]
pub struct OutputGauge(Arc<Flow>);

#[derive(Debug, thiserror::Error)]
#[error("client sent more than {limit} bytes of input without reading the program's output")]
pub struct Overflow {
    pub limit: usize,
}

/// A session channel's stdin queue.
pub fn stdin_queue() -> (StdinTx, StdinRx) {
    queue(MAX_STDIN_BUFFER_BYTES, MAX_STDIN_OVERFLOW_BYTES)
}

/// A forwarded connection's queue (smaller: there are more of them).
pub fn forward_queue() -> (StdinTx, StdinRx) {
    queue(MAX_FORWARD_BUFFER_BYTES, MAX_FORWARD_OVERFLOW_BYTES)
}

fn queue(soft: usize, hard: usize) -> (StdinTx, StdinRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let flow = Arc::new(Flow {
        budget: Semaphore::new(soft),
        overflow: AtomicUsize::new(0),
        output_blocked: AtomicBool::new(false),
        output_blocked_changed: Notify::new(),
        eof_sent: AtomicBool::new(false),
        soft,
        hard,
    });
    (
        StdinTx {
            tx,
            flow: Arc::clone(&flow),
        },
        StdinRx { rx, flow },
    )
}

impl StdinTx {
    /// Queues one SSH data packet (≤ 32 KiB, so always within the budget).
    pub async fn push(&self, data: &[u8]) -> Result<(), Overflow> {
        let flow = &self.flow;
        if data.is_empty() || flow.eof_sent.load(Ordering::Relaxed) {
            return Ok(());
        }
        let n = data.len().min(flow.soft);
        let permits = u32::try_from(n).unwrap_or(u32::MAX);
        loop {
            let changed = flow.output_blocked_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match flow.budget.try_acquire_many(permits) {
                Ok(p) => {
                    p.forget();
                    break;
                }
                Err(TryAcquireError::Closed) => return Ok(()),
                Err(TryAcquireError::NoPermits) => {}
            }
            if flow.output_blocked.load(Ordering::Acquire) {
                let before = flow.overflow.fetch_add(n, Ordering::AcqRel);
                if before + n > flow.hard {
                    return Err(Overflow {
                        limit: flow.soft + flow.hard,
                    });
                }
                break;
            }
            tokio::select! {
                p = flow.budget.acquire_many(permits) => match p {
                    Ok(p) => { p.forget(); break; }
                    Err(_) => return Ok(()),
                },
                () = &mut changed => {}
            }
        }
        let _ = self.tx.send(StdinMsg::Data(Bytes::copy_from_slice(data)));
        Ok(())
    }

    pub fn eof(&self) {
        if !self.flow.eof_sent.swap(true, Ordering::Relaxed) {
            let _ = self.tx.send(StdinMsg::Eof);
        }
    }
}

impl Flow {
    /// Returns consumed bytes: first to the overflow, then to the budget.
    fn release(&self, mut n: usize) {
        let _ = self
            .overflow
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                let take = o.min(n);
                n -= take;
                Some(o - take)
            });
        if n > 0 {
            self.budget.add_permits(n);
        }
    }
}

impl Drop for StdinRx {
    fn drop(&mut self) {
        self.flow.budget.close();
    }
}

impl StdinRx {
    pub fn gauge(&self) -> OutputGauge {
        OutputGauge(Arc::clone(&self.flow))
    }

    /// The next queued chunk (`Some(None)` at EOF, `None` when the client side is gone).
    /// Call [`Self::release`] with its length once it has been delivered.
    pub async fn next(&mut self) -> Option<Option<Bytes>> {
        match self.rx.recv().await? {
            StdinMsg::Data(b) => Some(Some(b)),
            StdinMsg::Eof => Some(None),
        }
    }

    /// Returns the budget for `n` delivered bytes.
    pub fn release(&self, n: usize) {
        self.flow.release(n.min(self.flow.soft));
    }

    /// Copies queued input into the program until EOF (then half-closes) or a write fails.
    pub async fn pump<W: AsyncWrite + Unpin>(mut self, mut writer: W) {
        while let Some(msg) = self.rx.recv().await {
            match msg {
                StdinMsg::Data(b) => {
                    if writer.write_all(&b).await.is_err() {
                        break;
                    }
                    self.flow.release(b.len().min(self.flow.soft));
                }
                StdinMsg::Eof => {
                    // Half-close: the program sees EOF and can still write its output.
                    let _ = writer.shutdown().await;
                    break;
                }
            }
        }
    }
}

impl OutputGauge {
    /// Runs one output write, flagging the time it spends waiting on the client.
    pub async fn write<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        data: &[u8],
    ) -> std::io::Result<()> {
        let fut = w.write_all(data);
        tokio::pin!(fut);
        tokio::select! {
            biased;
            r = &mut fut => return r,
            () = std::future::ready(()) => {}
        }
        let flow = &self.0;
        flow.output_blocked.store(true, Ordering::Release);
        flow.output_blocked_changed.notify_waiters();
        let r = fut.await;
        flow.output_blocked.store(false, Ordering::Release);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reader_waits_at_the_budget_unless_output_is_blocked() {
        let (tx, rx) = stdin_queue();
        let packet = vec![0u8; 32 * 1024];
        for _ in 0..(MAX_STDIN_BUFFER_BYTES / packet.len()) {
            tx.push(&packet).await.unwrap();
        }
        // Full: the next push waits.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), tx.push(&packet)).await;
        assert!(
            waited.is_err(),
            "push should wait when the budget is used up"
        );
        // Output blocked on the client: push proceeds into overflow.
        rx.flow.output_blocked.store(true, Ordering::Release);
        rx.flow.output_blocked_changed.notify_waiters();
        tx.push(&packet).await.unwrap();
        assert_eq!(rx.flow.overflow.load(Ordering::Acquire), packet.len());
        // Consumption pays back overflow first.
        rx.flow.release(packet.len());
        assert_eq!(rx.flow.overflow.load(Ordering::Acquire), 0);
        assert_eq!(rx.flow.budget.available_permits(), 0);
    }

    #[tokio::test]
    async fn overflow_has_a_hard_limit() {
        let (tx, rx) = stdin_queue();
        rx.flow.output_blocked.store(true, Ordering::Release);
        let packet = vec![0u8; 32 * 1024];
        let mut result = Ok(());
        for _ in 0..((MAX_STDIN_BUFFER_BYTES + MAX_STDIN_OVERFLOW_BYTES) / packet.len() + 1) {
            result = tx.push(&packet).await;
            if result.is_err() {
                break;
            }
        }
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn dropped_program_side_discards_input() {
        let (tx, rx) = stdin_queue();
        drop(rx);
        let packet = vec![0u8; 32 * 1024];
        for _ in 0..((MAX_STDIN_BUFFER_BYTES / packet.len()) * 2) {
            tx.push(&packet).await.unwrap();
        }
    }
}
