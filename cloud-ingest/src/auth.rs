//! Device authentication: a bearer token per device, stored as its SHA-256, compared in
//! constant time, or its verified client certificate (mTLS; a device may have no token and
//! log in that way only). Unknown device and wrong token get the same answer, so neither is
//! revealed.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Device;

/// The device registry.
#[derive(Debug, Clone)]
pub struct Registry {
    devices: HashMap<String, Device>,
}

/// A device whose token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// Device id.
    pub device_id: String,
    /// Its tenant.
    pub tenant: String,
}

/// SHA-256 of a token, as stored in the config.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Registry {
    /// A registry of these devices.
    pub fn new(devices: HashMap<String, Device>) -> Registry {
        Registry { devices }
    }

    /// The device a verified client certificate names (mTLS), if it is registered.
    pub fn by_certificate(&self, device_id: &str) -> Option<Authenticated> {
        let device = self.devices.get(device_id)?;
        Some(Authenticated {
            device_id: device_id.to_owned(),
            tenant: device.tenant.clone(),
        })
    }

    /// Checks `token` for `device_id`; `None` when the device is unknown or the token is wrong.
    pub fn authenticate(&self, device_id: &str, token: &str) -> Option<Authenticated> {
        let presented = hash_token(token);
        let device = self.devices.get(device_id)?;
        // A device without a token logs in with its certificate only: no token matches.
        let expected = device.token_sha256?;
        bool::from(expected.ct_eq(&presented)).then(|| Authenticated {
            device_id: device_id.to_owned(),
            tenant: device.tenant.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let registry = Registry::new(HashMap::from([
            (
                "dev-1".to_owned(),
                Device {
                    tenant: "acme".into(),
                    token_sha256: Some(hash_token("s3cret")),
                },
            ),
            (
                "cert-only".to_owned(),
                Device {
                    tenant: "acme".into(),
                    token_sha256: None,
                },
            ),
        ]));
        let ok = Some(Authenticated {
            device_id: "dev-1".into(),
            tenant: "acme".into(),
        });
        for (device, token, want) in [
            ("dev-1", "s3cret", ok),
            ("dev-1", "s3cret ", None),
            ("dev-1", "", None),
            ("dev-2", "s3cret", None),
            ("cert-only", "", None),
            ("cert-only", "s3cret", None),
        ] {
            assert_eq!(
                registry.authenticate(device, token),
                want,
                "{device} {token:?}"
            );
        }
        assert!(registry.by_certificate("cert-only").is_some());
    }
}
