//! The SSH side: russh configuration built field by field from our settings (never from
//! russh's defaults, which offer `none`/`hostbased` and ten auth attempts), the thin russh
//! [`handler`], and one file per lifecycle: [`connection`] (with [`auth`] for its
//! Authenticating phase), [`session_channel`], [`forward`] (forwarded channels) and
//! [`listen`] (listeners in the container); [`flow`] bounds what clients send, [`timeouts`]
//! what sessions may last.

pub mod auth;
pub mod connection;
pub mod flow;
pub mod forward;
pub mod handler;
pub mod hostkey;
pub mod listen;
pub mod program;
pub mod session_channel;
pub mod timeouts;
pub mod version;

use std::borrow::Cow;
use std::sync::Arc;

use russh::keys::{Algorithm, EcdsaCurve, PrivateKey};
use russh::server::Config;
use russh::{cipher, kex, mac, MethodKind, MethodSet, Preferred, SshId};

use crate::config::Settings;

/// Failed authentication attempts all take this long, so timing does not tell a wrong user
/// from a wrong key or password.
pub const AUTH_REJECTION_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// Largest packet we accept; OpenSSH's value.
pub const MAX_PACKET_SIZE: u32 = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SshConfigError {
    #[error("{key}: algorithm {name} is not available in this build")]
    Algorithm { key: &'static str, name: String },
}

/// Maps validated algorithm names to russh's; a name russh lacks is a build mismatch.
fn names<T>(
    list: &[&'static str],
    key: &'static str,
    parse: impl Fn(&'static str) -> Result<T, ()>,
) -> Result<Vec<T>, SshConfigError> {
    list.iter()
        .map(|n| {
            parse(n).map_err(|()| SshConfigError::Algorithm {
                key,
                name: (*n).into(),
            })
        })
        .collect()
}

pub fn russh_config(
    settings: &Settings,
    keys: Vec<PrivateKey>,
) -> Result<Arc<Config>, SshConfigError> {
    // Every configured method is offered, and stays offered after a failure (the handler
    // answers each rejection with this whole set, as sshd does).
    let mut methods = MethodSet::empty();
    if settings.authorized_keys.is_some()
        || settings.pubkey_webhook.is_some()
        || settings.trusted_user_ca_keys.is_some()
    {
        methods.push(MethodKind::PublicKey);
    }
    if settings.password_file.is_some() || settings.password_webhook.is_some() {
        methods.push(MethodKind::Password);
    }

    let mut kex_names = names(&settings.ssh.kex, "ssh.kex", kex::Name::try_from)?;
    // Extension markers: ext-info (rsa-sha2 negotiation) and strict KEX (Terrapin).
    kex_names.push(kex::EXTENSION_SUPPORT_AS_SERVER);
    kex_names.push(kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER);
    let ciphers = names(&settings.ssh.ciphers, "ssh.ciphers", cipher::Name::try_from)?;
    let macs = names(&settings.ssh.macs, "ssh.macs", mac::Name::try_from)?;

    let preferred = Preferred {
        kex: Cow::Owned(kex_names),
        key: Cow::Owned(vec![
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP384,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP521,
            },
        ]),
        host_key_certificates: Cow::Owned(Vec::new()),
        cipher: Cow::Owned(ciphers),
        mac: Cow::Owned(macs),
        compression: Cow::Owned(vec![russh::compression::NONE]),
    };

    Ok(Arc::new(Config {
        server_id: SshId::Standard(Cow::Owned(settings.ssh.server_version.clone())),
        methods,
        auth_rejection_time: AUTH_REJECTION_TIME,
        // OpenSSH clients open with a `none` probe; answering it at once saves a round of delay
        // on every login and reveals nothing (the method list is the same for every user).
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        keys,
        certificates: Vec::new(),
        limits: russh::Limits::default(),
        // Every channel starts with this window and is granted more as its consumer drains it
        // (`flow`): one channel whose program does not read stops only its own client.
        window_size: crate::limits::CHANNEL_WINDOW_INITIAL as u32,
        manual_window_adjust: true,
        maximum_packet_size: MAX_PACKET_SIZE,
        channel_buffer_size: 100,
        event_buffer_size: 64,
        preferred,
        // The handler counts refusals the way sshd does and disconnects at ssh.maxAuthTries;
        // russh's own count (which includes the first `none` probe and the refusals it makes
        // itself, such as a bad signature) stays one behind as a backstop.
        max_auth_attempts: usize::try_from(settings.ssh.max_auth_tries).unwrap_or(usize::MAX) + 1,
        // Idle shells are legitimate; the login grace timer and keepalives handle dead peers.
        inactivity_timeout: None,
        keepalive_interval: settings.ssh.client_alive.map(|(i, _)| i),
        keepalive_max: settings.ssh.client_alive.map_or(3, |(_, n)| n),
        nodelay: true,
    }))
}
