//! The server in a test's own process, on a backend of the test's choosing (usually
//! [`crate::backend::fake`]): the whole SSH side, without an engine or a subprocess. Not part
//! of the product (feature `test-support`): no sandbox is entered, and the log goes where the
//! test wants it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;

use crate::backend::Backend;
use crate::config::Settings;
use crate::shared::Prepared;

/// A server running in this process.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

/// Serves `settings` on `backend` in a runtime of its own, logging (at debug level, as
/// text) to `log`.
pub fn serve<W>(
    settings: Settings,
    backend: Arc<dyn Backend>,
    log: W,
) -> Result<Running, Box<dyn std::error::Error>>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let listener = crate::server::listen(settings.ssh.listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let shared = Prepared::read(&settings, backend)?.into_shared(settings)?;
    let shutdown = shared.shutdown.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log)
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let dispatch = tracing::Dispatch::new(subscriber);
    let for_threads = dispatch.clone();
    // Every thread of this server's runtime logs to `log`, whatever the test's other
    // servers do.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("containerssh-test")
        .on_thread_start(move || {
            std::mem::forget(tracing::dispatcher::set_default(&for_threads));
        })
        .build()?;
    let thread = std::thread::Builder::new()
        .name("containerssh-test-server".into())
        .spawn(move || {
            let _log = tracing::dispatcher::set_default(&dispatch);
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        crate::server::serve(shared, l).await;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot serve"),
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(5));
        })?;
    Ok(Running {
        addr,
        shutdown,
        thread: Some(thread),
    })
}

impl Running {
    /// Drains as on SIGTERM and waits for the server to stop.
    pub fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}
