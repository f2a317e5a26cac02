//! The Authenticating phase of a connection (see `ssh/connection.rs`): every method's checks,
//! counted as sshd counts them, and the login's last checks (authz webhook, config webhook,
//! metadata) before [`ConnCtx::authenticated`] fixes the login.
//!
//! Every request gets an answer: a refusal lists every configured method (russh's
//! `Auth::reject()` would drop the one tried, locking out a user who mistyped), after russh's
//! fixed delay; `ssh.maxAuthTries` refusals of all methods together end the connection; the
//! user name may not change. Blocking file reads (authorized_keys, a per-login backend's
//! files) run on the blocking pool, never on a runtime thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use russh::keys::PublicKey;
use russh::server::Auth;

use super::connection::{AuthedUser, ConnCtx, Login};
use crate::auth::authorized_keys::KeyOptions;
use crate::auth::metadata::LoginMetadata;
use crate::auth::webhook::{self as auth_webhook, LoginState, Peer, Verdict};

/// Public keys whose webhook answer is kept between the offer and the signed attempt.
const MAX_PUBKEY_ANSWERS: usize = 16;

pub struct Authenticator {
    conn: Arc<ConnCtx>,
    /// The auth webhook's answers for public keys offered on this connection (`None`:
    /// refused), so that the signed attempt after an offer costs no second call.
    pubkey_answers: HashMap<String, Option<LoginState>>,
    /// The user name of the first authentication request (it may not change, as in sshd).
    user: Option<String>,
    /// Authentication requests seen (callbacks, so a signed key after its offer counts twice:
    /// only "is this the first" matters).
    requests: u32,
    /// Refusals counted towards `ssh.maxAuthTries`.
    failures: u32,
    /// The method of the request being answered (metrics' `authtype`).
    method: &'static str,
    /// The public key (or certificate) of the signed attempt being answered, for the audit
    /// recording.
    key: String,
}

impl Authenticator {
    pub fn new(conn: Arc<ConnCtx>) -> Self {
        Self {
            conn,
            pubkey_answers: HashMap::new(),
            user: None,
            requests: 0,
            failures: 0,
            method: "none",
            key: String::new(),
        }
    }

    /// The answer to a refused request: every configured method stays offered.
    fn rejection(&self) -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(self.conn.shared.ssh.methods.clone()),
            partial_success: false,
        }
    }

    /// Every authentication callback starts here. `Err` carries the answer when the user name
    /// changed between requests: sshd disconnects then, and so do we (a login's state must
    /// never carry over to another user).
    pub fn begin(&mut self, user: &str, method: &'static str) -> Result<(), Auth> {
        self.requests += 1;
        self.method = method;
        match &self.user {
            None => {
                self.user = Some(user.to_string());
                Ok(())
            }
            Some(first) if first == user => Ok(()),
            Some(first) => {
                tracing::info!(code = "SSH_AUTH_USERNAME_CHANGED", connection_id = %self.conn.id, first = %first.escape_debug(), user = %user.escape_debug(), "the user name changed between authentication requests: disconnecting");
                self.conn.disconnect(
                    russh::Disconnect::ProtocolError,
                    "Change of username or service not allowed",
                );
                Err(self.rejection())
            }
        }
    }

    /// Names the key of the signed attempt being answered (the audit recording's `key`).
    pub fn attempt_key(&mut self, key: String) {
        self.key = key;
    }

    /// The audit recording's message for the attempt's outcome (`None` for the methods it has
    /// no message for).
    fn audit_attempt(&self, user: &str, ok: bool) {
        let user = user.to_string();
        let msg = match self.method {
            "password" => crate::audit::Msg::AuthPassword { user, ok: Some(ok) },
            "pubkey" => crate::audit::Msg::AuthPubkey {
                user,
                key: self.key.clone(),
                ok,
            },
            _ => return,
        };
        self.conn.audit(None, msg);
    }

    /// A refused attempt, counted as sshd counts them (every method together); at
    /// `ssh.maxAuthTries` the client is disconnected with the reason.
    pub fn refuse(&mut self) -> Auth {
        if let Some(user) = self.user.clone() {
            // An offered key is not an attempt (only its signed use is).
            if self.method != "pubkey" || !self.key.is_empty() {
                self.audit_attempt(&user, false);
            }
        }
        self.key.clear();
        self.failures += 1;
        crate::metrics::get()
            .auth_failures
            .inc(&[crate::metrics::COUNTRY, self.method, "0"]);
        self.conn.auth_failed();
        let max = self.conn.shared.settings.ssh.max_auth_tries;
        if self.failures >= max {
            tracing::info!(code = "SSH_AUTH_TOO_MANY_FAILURES", connection_id = %self.conn.id, user = %self.user.as_deref().unwrap_or("").escape_debug(), failures = self.failures, "too many authentication failures (ssh.maxAuthTries): disconnecting");
            self.conn.disconnect(
                russh::Disconnect::NoMoreAuthMethodsAvailable,
                "Too many authentication failures",
            );
        }
        self.rejection()
    }

    /// `none`: clients open with it for the method list; like sshd, only a later one counts
    /// as a failed attempt.
    pub fn none(&mut self) -> Auth {
        if self.requests == 1 {
            self.rejection()
        } else {
            self.refuse()
        }
    }

    fn peer(&self) -> Peer {
        Peer {
            connection_id: self.conn.id.clone(),
            remote_address: self.conn.peer.to_string(),
            client_version: self.conn.hello.version.get().cloned().unwrap_or_default(),
        }
    }

    /// Asks the public-key webhook (once per user and key on this connection).
    pub async fn webhook_key(&mut self, user: &str, key: &PublicKey) -> Option<LoginState> {
        let hook = self.conn.shared.webhooks.public_key.clone()?;
        let Ok(text) = key.to_openssh() else {
            return None;
        };
        // authorized_keys form without a comment.
        let text: String = text.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let cache_key = format!("{user}\0{text}");
        if let Some(answer) = self.pubkey_answers.get(&cache_key) {
            return answer.clone();
        }
        let answer = match auth_webhook::public_key(&hook, user, &text, &self.peer()).await {
            Ok(Verdict::Allowed(state)) => Some(state),
            Ok(Verdict::Denied) => {
                tracing::info!(code = "AUTH_FAILED", connection_id = %self.conn.id, user = %user.escape_debug(), "public key refused by the auth webhook");
                None
            }
            Err(e) => {
                tracing::warn!(code = "AUTH_BACKEND_ERROR", connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "auth webhook failed: public key refused");
                None
            }
        };
        if self.pubkey_answers.len() < MAX_PUBKEY_ANSWERS {
            self.pubkey_answers.insert(cache_key, answer.clone());
        }
        answer
    }

    /// The matching `authorized_keys` line's options, read on the blocking pool.
    pub async fn check_key(&self, user: &str, key: &PublicKey) -> Option<KeyOptions> {
        self.conn.shared.authorized_keys.as_ref()?;
        let (shared, user, key) = (Arc::clone(&self.conn.shared), user.to_string(), key.clone());
        let ip = self.conn.peer.ip();
        let found = tokio::task::spawn_blocking(move || {
            shared
                .authorized_keys
                .as_ref()
                .map(|ak| ak.find(&user, &key, ip, SystemTime::now()))
        })
        .await;
        match found {
            Ok(Some(Ok(found))) => found,
            Ok(Some(Err(e))) => {
                tracing::warn!(code = "AUTH_KEYS_READ_FAILED", connection_id = %self.conn.id, error = %e, "cannot read authorized keys");
                None
            }
            Ok(None) | Err(_) => None,
        }
    }

    /// Merges the config webhook's configuration onto the file's: the login's own settings and
    /// backend, not yet applied. A backend of its own reads files (certificates, kubeconfig):
    /// on the blocking pool.
    async fn login_config(
        &self,
        user: &str,
        overlay: &serde_json::Value,
    ) -> Result<
        (
            Arc<crate::config::Settings>,
            Arc<dyn crate::backend::Backend>,
        ),
        String,
    > {
        let shared = Arc::clone(&self.conn.shared);
        let label = format!("config webhook answer for {}", user.escape_debug());
        let overlay = overlay.clone();
        tokio::task::spawn_blocking(move || {
            let settings = crate::config::merge::merge(&label, &shared.settings.file, &overlay)
                .map_err(|e| e.to_string())?;
            let settings = Arc::new(settings);
            let backend = crate::backend::build::for_login(
                &shared.backend,
                &shared.janitor,
                &shared.settings,
                &settings,
            )?;
            Ok((settings, backend))
        })
        .await
        .unwrap_or_else(|_| Err("the configuration reader failed".into()))
    }

    /// After a successful authentication: the authz webhook (when configured), the config
    /// webhook, then the login's metadata; the connection is authenticated as the webhook's
    /// `authenticatedUsername` when it names one. Nothing is applied to the connection until
    /// the last check that can refuse the login has passed.
    pub async fn finish(
        &mut self,
        user: &str,
        key_options: Option<KeyOptions>,
        mut state: LoginState,
        method: &'static str,
    ) -> Auth {
        if let Some(hook) = self.conn.shared.webhooks.authz.clone() {
            match auth_webhook::authz(&hook, user, state, &self.peer()).await {
                Ok(Verdict::Allowed(s)) => state = s,
                Ok(Verdict::Denied) => {
                    tracing::info!(code = "SSH_AUTH_FAILED", connection_id = %self.conn.id, user = %user.escape_debug(), method, "login refused by the authz webhook");
                    return self.refuse();
                }
                Err(e) => {
                    tracing::warn!(code = "AUTH_BACKEND_ERROR", connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "authz webhook failed: login refused");
                    return self.refuse();
                }
            }
        }
        let mut profile = None;
        if let Some(hook) = self.conn.shared.webhooks.config.clone() {
            let sensitive = self.conn.shared.settings.transmit_sensitive_metadata;
            match auth_webhook::config(&hook, user, state, &self.peer(), sensitive).await {
                Ok((s, overlay)) => {
                    state = s;
                    if let Some(overlay) = overlay {
                        match self.login_config(user, &overlay).await {
                            Ok(p) => profile = Some(p),
                            Err(e) => {
                                tracing::warn!(code = "CONFIG_REFUSED", connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "login refused: the config webhook's configuration cannot be used");
                                return self.refuse();
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(code = "CONFIG_BACKEND_ERROR", connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "config webhook failed: login refused");
                    return self.refuse();
                }
            }
        }
        let name = if state.authenticated_username.is_empty() {
            user.to_string()
        } else {
            state.authenticated_username.clone()
        };
        let Some(base) = self.metadata(&name).await else {
            return self.refuse();
        };
        // Every check has passed: from here on the login is what the connection runs with.
        let metadata = Arc::new(state.apply(&base));
        let shared = &self.conn.shared;
        let (settings, backend) = match profile {
            Some((settings, backend)) => {
                if settings.log.level != shared.settings.log.level {
                    crate::log::set_connection_level(&self.conn.id, settings.log.level);
                }
                tracing::debug!(connection_id = %self.conn.id, backend = ?settings.backend, mode = ?settings.mode(), "per-login configuration");
                (settings, backend)
            }
            None => (Arc::clone(&shared.settings), Arc::clone(&shared.backend)),
        };
        tracing::info!(code = "SSH_AUTH_SUCCESSFUL", connection_id = %self.conn.id, user = %user.escape_debug(), authenticated_as = %name.escape_debug(), method, "authenticated");
        self.audit_attempt(user, true);
        self.conn.audit(
            None,
            crate::audit::Msg::HandshakeSuccessful { user: name.clone() },
        );
        crate::metrics::get()
            .auth_success
            .inc(&[crate::metrics::COUNTRY, self.method, "0"]);
        self.conn.authenticated(Login {
            user: AuthedUser {
                name,
                key_options,
                metadata,
            },
            settings,
            backend,
        });
        Auth::Accept
    }

    /// A password, checked against the password file or the auth webhook.
    pub async fn password(&mut self, user: &str, password: &str) -> Auth {
        let Some(checker) = self.conn.shared.passwords.as_ref() else {
            let Some(hook) = self.conn.shared.webhooks.password.clone() else {
                return self.refuse();
            };
            let pw = Secret(password.as_bytes().to_vec());
            let verdict = auth_webhook::password(&hook, user, &pw.0, &self.peer()).await;
            drop(pw);
            return match verdict {
                Ok(Verdict::Allowed(state)) => self.finish(user, None, state, "password").await,
                Ok(Verdict::Denied) => {
                    tracing::info!(code = "AUTH_FAILED", connection_id = %self.conn.id, user = %user.escape_debug(), "password refused by the auth webhook");
                    self.refuse()
                }
                Err(e) => {
                    tracing::warn!(code = "AUTH_BACKEND_ERROR", connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "auth webhook failed: password refused");
                    self.refuse()
                }
            };
        };
        match checker.verify(user, password.as_bytes()).await {
            Ok(true) => {
                self.finish(user, None, LoginState::default(), "password")
                    .await
            }
            Ok(false) => {
                tracing::info!(code = "SSH_AUTH_FAILED", connection_id = %self.conn.id, user = %user.escape_debug(), "password refused");
                self.refuse()
            }
            Err(e) => {
                tracing::warn!(code = "AUTH_PASSWORD_CHECK_FAILED", connection_id = %self.conn.id, error = %e, "cannot check password");
                self.refuse()
            }
        }
    }

    /// The login's environment and files; `None` (login refused, reason logged) when a file
    /// cannot be read: a login never starts without what the operator configured for it.
    async fn metadata(&self, user: &str) -> Option<Arc<LoginMetadata>> {
        let template = &self.conn.shared.settings.metadata;
        let resolved = if template.has_files() {
            let (t, u) = (template.clone(), user.to_string());
            tokio::task::spawn_blocking(move || t.resolve(&u))
                .await
                .unwrap_or_else(|_| Err("file reader failed".into()))
        } else {
            template.resolve(user)
        };
        match resolved {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                tracing::warn!(code = "AUTH_METADATA_FAILED", connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "login refused: auth.metadata");
                None
            }
        }
    }
}

/// A copy of a password for the webhook call, wiped on drop.
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}
