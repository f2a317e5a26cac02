//! The accept loop and each connection's life: a pre-auth permit before `accept`, the login
//! grace timer, the russh session, and cleanup when it ends. On shutdown the loop stops
//! accepting, every connection is told and closed, and their containers are removed.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::authorized_keys::AuthorizedKeys;
use crate::auth::password::PasswordFile;
use crate::backend::Backend;
use crate::config::Settings;
use crate::limits::{
    ACCEPT_ERROR_BACKOFF, MAX_CONNECTIONS, MAX_UNAUTHENTICATED_CONNECTIONS, SHUTDOWN_DRAIN,
};
use crate::ssh::conn::ConnCtx;
use crate::ssh::handler::Handler;
use crate::ssh::version::VersionRecorder;
use crate::webhook::Webhook;

/// What every connection shares.
pub struct Shared {
    pub settings: Settings,
    pub ssh: Arc<russh::server::Config>,
    pub authorized_keys: Option<AuthorizedKeys>,
    /// `auth.publicKey.trustedUserCAKeys`, loaded.
    pub trusted_cas: Option<crate::auth::certificate::TrustedCas>,
    pub passwords: Option<Arc<PasswordFile>>,
    pub backend: Arc<Backend>,
    pub webhooks: AuthWebhooks,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
}

/// The auth webhooks configured (`auth.{password,publicKey,authz}.method: webhook`).
#[derive(Default)]
pub struct AuthWebhooks {
    pub password: Option<Webhook>,
    pub public_key: Option<Webhook>,
    pub authz: Option<Webhook>,
    /// `configserver.url`.
    pub config: Option<Webhook>,
}

impl AuthWebhooks {
    pub fn new(settings: &Settings) -> Result<Self, String> {
        let make = |key: &str, cfg: &Option<crate::config::model::WebhookConfig>| {
            cfg.as_ref().map(|c| Webhook::new(key, c)).transpose()
        };
        Ok(Self {
            password: make("auth.password.webhook", &settings.password_webhook)?,
            public_key: make("auth.publicKey.webhook", &settings.pubkey_webhook)?,
            authz: make("auth.authz.webhook", &settings.authz_webhook)?,
            config: make("configserver", &settings.config_webhook)?,
        })
    }
}

/// Serves until `shared.shutdown` is cancelled, then drains.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let preauth = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED_CONNECTIONS));
    let total = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    loop {
        // Permits first: at the limit we stop accepting, and the kernel's backlog holds the
        // rest, instead of accepting sockets we cannot serve.
        let permits = tokio::select! {
            p = async {
                let a = Arc::clone(&total).acquire_owned().await;
                let b = Arc::clone(&preauth).acquire_owned().await;
                (a, b)
            } => p,
            () = shared.shutdown.cancelled() => break,
        };
        let (Ok(conn_permit), Ok(preauth_permit)) = permits else {
            break;
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    connection(shared, stream, peer, preauth_permit).await;
                    drop(conn_permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; never stop serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
    drop(listener);
    connections.close();
    tracing::info!(
        connections = connections.len(),
        "shutting down: closing connections"
    );
    if tokio::time::timeout(SHUTDOWN_DRAIN, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections did not close within the drain deadline");
    }
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    preauth: OwnedSemaphorePermit,
) {
    // russh applies `Config::nodelay` only in its own accept loop; without it Nagle and delayed
    // ACKs hold the last packets of every session back by ~40 ms.
    if let Err(e) = stream.set_nodelay(shared.ssh.nodelay) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let conn = ConnCtx::new(Arc::clone(&shared), peer);
    tracing::info!(connection_id = %conn.id, remote = %peer, "connected");
    let handler = Handler::new(Arc::clone(&conn), preauth);
    let grace = shared.settings.login_grace_time;
    let session = tokio::select! {
        r = russh::server::run_stream(
            Arc::clone(&shared.ssh),
            VersionRecorder::new(stream, Arc::clone(&conn.client_version)),
            handler,
        ) => r,
        () = tokio::time::sleep(grace) => {
            tracing::info!(connection_id = %conn.id, "no SSH handshake within the login grace time");
            return;
        }
    };
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(connection_id = %conn.id, error = %e, "handshake failed");
            return;
        }
    };
    let handle = session.handle();
    let login_deadline = tokio::time::Instant::now() + grace;
    let grace_timer = async {
        tokio::time::sleep_until(login_deadline).await;
        if conn.is_authenticated() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = &mut session => {
            if let Err(e) = r {
                tracing::debug!(connection_id = %conn.id, error = %e, "connection ended with an error");
            }
        }
        () = grace_timer => {
            tracing::info!(connection_id = %conn.id, "login grace time exceeded");
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, "login grace time exceeded".into(), String::new())
                .await;
        }
        () = shared.shutdown.cancelled() => {
            // Channels print their notice and close when the connection token is cancelled.
            conn.cancel.cancel();
            conn.tasks.close();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.tasks.wait()).await;
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, "server shutting down".into(), String::new())
                .await;
        }
    }
    conn.close().await;
    tracing::info!(connection_id = %conn.id, "disconnected");
}
