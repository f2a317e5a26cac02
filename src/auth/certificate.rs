//! OpenSSH user certificates (beyond ContainerSSH, its issue #331): a certificate signed by one
//! of the CA keys in `auth.publicKey.trustedUserCAKeys` (one public key per line, as sshd's
//! `TrustedUserCAKeys`) logs in a user named among its principals, within its validity window.
//! Critical options are honoured (`force-command`, `source-address`); any other critical
//! option refuses the certificate, as PROTOCOL.certkeys requires. Extensions map to the same
//! restrictions authorized_keys options give (`permit-pty`, `permit-port-forwarding`,
//! `permit-agent-forwarding`, `permit-X11-forwarding`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Certificate, Fingerprint, HashAlg, PublicKey};

use super::authorized_keys::KeyOptions;

/// Lines read from a CA key file.
pub const MAX_TRUSTED_CA_KEYS: usize = 1024;
/// Largest CA key file read.
pub const MAX_TRUSTED_CA_FILE_BYTES: u64 = 1024 * 1024;
/// Entries in a `source-address` list.
const MAX_SOURCE_ADDRESSES: usize = 256;

/// The trusted CA keys, by SHA-256 fingerprint.
#[derive(Clone, Debug)]
pub struct TrustedCas {
    fingerprints: Vec<Fingerprint>,
}

/// What an accepted certificate brings to the login.
#[derive(Clone, Debug)]
pub struct CertLogin {
    pub options: KeyOptions,
    pub key_id: String,
    pub principals: Vec<String>,
}

impl TrustedCas {
    /// Reads CA public keys (`ssh-ed25519 AAAA… comment`; `#` comments and blank lines
    /// skipped); a line that is not a public key is an error naming it.
    pub fn load(path: &Path) -> Result<Self, String> {
        let data = super::read_capped(path, MAX_TRUSTED_CA_FILE_BYTES)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .ok_or_else(|| {
                format!(
                    "{}: larger than {MAX_TRUSTED_CA_FILE_BYTES} bytes",
                    path.display()
                )
            })?;
        Self::parse(&String::from_utf8_lossy(&data)).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut fingerprints = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if fingerprints.len() >= MAX_TRUSTED_CA_KEYS {
                return Err(format!("more than {MAX_TRUSTED_CA_KEYS} keys"));
            }
            let key = PublicKey::from_openssh(line)
                .map_err(|e| format!("line {}: not a public key: {e}", n + 1))?;
            fingerprints.push(key.fingerprint(HashAlg::Sha256));
        }
        if fingerprints.is_empty() {
            return Err("no CA key in the file".into());
        }
        Ok(Self { fingerprints })
    }

    /// Checks `cert` for a login as `user` from `peer` at `now` (Unix seconds).
    pub fn check(
        &self,
        cert: &Certificate,
        user: &str,
        peer: IpAddr,
        now: u64,
    ) -> Result<CertLogin, String> {
        if cert.cert_type() != CertType::User {
            return Err("a host certificate, not a user certificate".into());
        }
        cert.validate_at(now, self.fingerprints.iter())
            .map_err(|_| {
                "not signed by a trusted CA, or outside its validity window".to_string()
            })?;
        // russh cannot tell us whether the key's holder touched it, so, as for authorized_keys
        // lines, a security key is accepted only where touch is waived.
        if super::authorized_keys::is_security_key_algorithm(&cert.public_key().algorithm())
            && !cert.extensions().contains_key("no-touch-required")
        {
            return Err(
                "a security-key certificate without the no-touch-required extension \
                 (user presence cannot be verified)"
                    .into(),
            );
        }
        if !cert.valid_principals().iter().any(|p| p == user) {
            return Err(format!(
                "{user:?} is not among the certificate's principals"
            ));
        }
        let options = check_options(cert.critical_options(), cert.extensions(), peer)?;
        Ok(CertLogin {
            options,
            key_id: cert.key_id().to_string(),
            principals: cert.valid_principals().to_vec(),
        })
    }
}

/// Critical options and extensions as login restrictions.
pub fn check_options(
    critical: &BTreeMap<String, String>,
    extensions: &BTreeMap<String, String>,
    peer: IpAddr,
) -> Result<KeyOptions, String> {
    let mut options = KeyOptions {
        no_pty: !extensions.contains_key("permit-pty"),
        no_port_forwarding: !extensions.contains_key("permit-port-forwarding"),
        no_agent_forwarding: !extensions.contains_key("permit-agent-forwarding"),
        no_x11_forwarding: !extensions.contains_key("permit-X11-forwarding"),
        ..KeyOptions::default()
    };
    for (name, value) in critical {
        match name.as_str() {
            "force-command" => {
                if value.contains('\0') {
                    return Err("force-command contains NUL".into());
                }
                options.command = Some(value.clone());
            }
            "source-address" => {
                if !source_address_allows(value, peer)? {
                    return Err(format!("source-address does not allow {peer}"));
                }
            }
            other => {
                return Err(format!(
                    "unsupported critical option {:?}",
                    other.escape_debug().to_string()
                ))
            }
        }
    }
    Ok(options)
}

/// Whether `peer` is in the comma-separated address/CIDR list.
fn source_address_allows(list: &str, peer: IpAddr) -> Result<bool, String> {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        v4 => v4,
    };
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if entries.len() > MAX_SOURCE_ADDRESSES {
        return Err("source-address lists too many entries".into());
    }
    let mut allowed = false;
    for entry in entries {
        let (addr, len) = match entry.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (entry, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("source-address: {entry:?} is not an address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u32 = match len {
            Some(l) => l
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("source-address: bad prefix length in {entry:?}"))?,
            None => max,
        };
        allowed |= in_prefix(addr, len, peer);
    }
    Ok(allowed)
}

fn in_prefix(net: IpAddr, len: u32, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// Fuzz entry: the input is cut into `name=value` lines, the first half critical options,
/// the rest extensions; checking them never panics and a forced command is kept verbatim.
pub fn fuzz_cert_options(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut critical = BTreeMap::new();
    let mut extensions = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        let map = if i % 2 == 0 {
            &mut critical
        } else {
            &mut extensions
        };
        map.insert(k.to_string(), v.to_string());
    }
    let peer = if data.first().is_some_and(|b| b % 2 == 0) {
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
    };
    if let Ok(opts) = check_options(&critical, &extensions, peer) {
        assert_eq!(opts.command.as_ref(), critical.get("force-command"));
        assert_eq!(opts.no_pty, !extensions.contains_key("permit-pty"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_and_extensions() {
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        let o = check_options(
            &map(&[
                ("force-command", "echo hi"),
                ("source-address", "192.168.0.0/16,10.0.0.0/8"),
            ]),
            &map(&[("permit-pty", "")]),
            peer,
        )
        .unwrap();
        assert_eq!(o.command.as_deref(), Some("echo hi"));
        assert!(!o.no_pty && o.no_port_forwarding && o.no_agent_forwarding);
        assert!(
            check_options(&map(&[("source-address", "10.1.2.4/32")]), &map(&[]), peer).is_err()
        );
        assert!(check_options(&map(&[("source-address", "10.1.2.3")]), &map(&[]), peer).is_ok());
        assert!(
            check_options(&map(&[("source-address", "10.1.2.3/33")]), &map(&[]), peer).is_err()
        );
        assert!(check_options(&map(&[("source-address", "nope")]), &map(&[]), peer).is_err());
        assert!(check_options(&map(&[("verify-required", "")]), &map(&[]), peer).is_err());
        // IPv4-mapped IPv6 peers match IPv4 lists; ::/0 matches IPv6.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(
            check_options(&map(&[("source-address", "10.0.0.0/8")]), &map(&[]), mapped).is_ok()
        );
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(check_options(&map(&[("source-address", "2001:db8::/32")]), &map(&[]), v6).is_ok());
        assert!(check_options(&map(&[("source-address", "0.0.0.0/0")]), &map(&[]), v6).is_err());
    }

    /// An `sk-ssh-ed25519@openssh.com` public key line (no device needed to certify one).
    fn sk_public_key_line() -> String {
        use base64::Engine;
        let mut blob = Vec::new();
        for part in [
            &b"sk-ssh-ed25519@openssh.com"[..],
            &[7u8; 32][..],
            &b"ssh:"[..],
        ] {
            blob.extend_from_slice(&u32::try_from(part.len()).unwrap().to_be_bytes());
            blob.extend_from_slice(part);
        }
        format!(
            "sk-ssh-ed25519@openssh.com {} fido",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    #[test]
    fn security_key_certificates_need_no_touch_required() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&ca)
            .status()
            .expect("ssh-keygen");
        assert!(st.success());
        let cas =
            TrustedCas::parse(&std::fs::read_to_string(ca.with_extension("pub")).unwrap()).unwrap();
        let sk = dir.path().join("sk.pub");
        for (extra, accepted) in [(None, false), (Some("no-touch-required"), true)] {
            std::fs::write(&sk, sk_public_key_line()).unwrap();
            let mut cmd = std::process::Command::new("ssh-keygen");
            cmd.args(["-q", "-s"])
                .arg(&ca)
                .args(["-I", "fido", "-n", "alice"]);
            if let Some(o) = extra {
                cmd.args(["-O", o]);
            }
            assert!(cmd.arg(&sk).status().unwrap().success());
            let text = std::fs::read_to_string(dir.path().join("sk-cert.pub")).unwrap();
            let cert = Certificate::from_openssh(text.trim()).unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let r = cas.check(&cert, "alice", "127.0.0.1".parse().unwrap(), now);
            assert_eq!(r.is_ok(), accepted, "{extra:?}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains("no-touch-required"), "{e}");
            }
        }
    }

    #[test]
    fn ca_files() {
        assert!(TrustedCas::parse("# none\n\n").is_err());
        let e = TrustedCas::parse("not a key\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let ok = TrustedCas::parse(
            "# the lab CA\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMBmXhbZ8fJ08xpe9KP6PRybpkz0RBrBYTw8DbyVTvR8 ca\n",
        )
        .unwrap();
        assert_eq!(ok.fingerprints.len(), 1);
    }
}
