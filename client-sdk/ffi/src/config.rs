//! The device's configuration as the host writes it: a record in Kotlin, Swift and Python, a JSON
//! object in C. Every field that has a safe default is optional; [`DeviceConfig::to_client_config`]
//! turns it into the SDK's [`ClientConfig`] and refuses what the SDK would refuse.

use serde::{Deserialize, Serialize};
use starling_proto::ids::ClientId;
use starling_sdk::config::{CoordinatorEndpoint, RetryPolicy};
use starling_sdk::{
    ClientConfig, ModelSpec, ParticipationPolicy, PrivacyMode, PrivacyPolicy, Retention, Storage, StorageKey,
};
use std::time::Duration;

use crate::error::StarlingError;
use crate::types::Consent;

/// The coordinator to train with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, uniffi::Record)]
pub struct CoordinatorConfig {
    /// `host:port` of its QUIC endpoint.
    pub address: String,
    /// The name its TLS certificate carries (`localhost`, `fl.example.com`).
    pub server_name: String,
    /// PEM of the CA that signed its certificate (the only CA trusted).
    pub ca_pem: String,
}

/// When the device may train. Default: charging, unmetered and idle (what production federated
/// learning does, so that users never pay for training in battery, data or responsiveness).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, uniffi::Record)]
pub struct ParticipationConfig {
    /// Train only while charging.
    pub require_charging: bool,
    /// Train only on an unmetered network.
    pub require_unmetered: bool,
    /// Train only while idle.
    pub require_idle: bool,
    /// Train only at or above this battery level.
    pub min_battery_percent: u8,
}

/// The device's configuration. See the module docs; the defaults are the SDK's
/// (`starling_sdk::ClientConfig::new`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, uniffi::Record)]
pub struct DeviceConfig {
    /// The client id the device was enrolled with.
    pub client_id: u64,
    /// The enrollment token (`starling token issue` prints it).
    pub credential: String,
    /// Model family: `"bpr-mf"` or `"two-tower"` (must match the coordinator's).
    pub model_family: String,
    /// Items in the catalogue (ids `0..items`).
    pub items: u32,
    /// Embedding dimension (must match the coordinator's).
    pub dim: u32,
    /// Directory of the on-device database (created 0700 if missing); `None` keeps everything in
    /// memory (nothing survives the process).
    #[serde(default)]
    #[uniffi(default = None)]
    pub storage_dir: Option<String>,
    /// 32-byte key for encryption at rest (from the Android Keystore / iOS Keychain); `None`
    /// stores unencrypted.
    #[serde(default)]
    #[uniffi(default = None)]
    pub storage_key: Option<Vec<u8>>,
    /// The coordinator; `None`: an offline device (rounds fail with a network error).
    #[serde(default)]
    #[uniffi(default = None)]
    pub coordinator: Option<CoordinatorConfig>,
    /// When training is allowed; `None`: charging, unmetered and idle.
    #[serde(default)]
    #[uniffi(default = None)]
    pub participation: Option<ParticipationConfig>,
    /// Consent until the user has chosen (a stored choice wins); `None`: both off.
    #[serde(default)]
    #[uniffi(default = None)]
    pub default_consent: Option<Consent>,
    /// Local DP: the smallest noise multiplier the device accepts (it then adds the noise itself
    /// and refuses tasks that ask for less); `None`: central DP (the coordinator adds the noise;
    /// the device always clips).
    #[serde(default)]
    #[uniffi(default = None)]
    pub local_dp_min_noise_multiplier: Option<f64>,
    /// The most ε this device ever spends under local DP; `None`: no cap.
    #[serde(default)]
    #[uniffi(default = None)]
    pub max_epsilon: Option<f64>,
    /// Delete events older than this many days; `None`: 90 days; `0`: keep until `max_events`.
    #[serde(default)]
    #[uniffi(default = None)]
    pub retention_days: Option<u32>,
    /// Keep at most this many events; `None`: 10,000; `0`: no count limit.
    #[serde(default)]
    #[uniffi(default = None)]
    pub max_events: Option<u64>,
    /// Positive interactions before recommendations become personal; `None`: 3.
    #[serde(default)]
    #[uniffi(default = None)]
    pub min_personal_events: Option<u32>,
    /// How long to wait for the coordinator's answers; `None`: 60 s.
    #[serde(default)]
    #[uniffi(default = None)]
    pub response_timeout_ms: Option<u64>,
    /// Connection attempts per round; `None`: 4.
    #[serde(default)]
    #[uniffi(default = None)]
    pub connect_attempts: Option<u32>,
}

impl DeviceConfig {
    /// The SDK's configuration, or why this one is unusable.
    pub fn to_client_config(&self) -> Result<ClientConfig, StarlingError> {
        let model = match self.model_family.as_str() {
            starling_models::family::MF_NAME => ModelSpec::mf(self.items, self.dim),
            starling_models::family::TWO_TOWER_NAME => ModelSpec::two_tower(self.items, self.dim),
            other => {
                return Err(StarlingError::invalid_config(format!(
                    "unknown model family {other:?} (\"bpr-mf\" or \"two-tower\")"
                )));
            }
        };
        let storage = match &self.storage_dir {
            Some(dir) if dir.is_empty() => return Err(StarlingError::invalid_config("storage_dir is empty")),
            Some(dir) => Storage::Dir(dir.into()),
            None => Storage::InMemory,
        };
        let mut c =
            ClientConfig::new(ClientId(self.client_id), self.credential.as_bytes().to_vec(), model, storage);
        if let Some(key) = &self.storage_key {
            c.storage_key = Some(
                StorageKey::from_slice(key)
                    .map_err(|e| StarlingError::invalid_config(format!("storage_key: {e}")))?,
            );
        }
        if let Some(co) = &self.coordinator {
            if co.ca_pem.trim().is_empty() {
                return Err(StarlingError::invalid_config("coordinator.ca_pem is empty"));
            }
            c.coordinator = Some(CoordinatorEndpoint {
                address: co.address.clone(),
                server_name: co.server_name.clone(),
                ca_pem: co.ca_pem.as_bytes().to_vec(),
            });
        }
        if let Some(p) = self.participation {
            c.participation = ParticipationPolicy {
                require_charging: p.require_charging,
                require_unmetered: p.require_unmetered,
                require_idle: p.require_idle,
                min_battery_percent: p.min_battery_percent,
            };
        }
        if let Some(consent) = self.default_consent {
            c.default_consent = consent.into();
        }
        c.privacy = PrivacyPolicy {
            mode: match self.local_dp_min_noise_multiplier {
                Some(m) if !(m.is_finite() && m > 0.0) => {
                    return Err(StarlingError::invalid_config(format!(
                        "local_dp_min_noise_multiplier must be a positive number, got {m}"
                    )));
                }
                Some(min_noise_multiplier) => PrivacyMode::Local { min_noise_multiplier },
                None => PrivacyMode::Central,
            },
            max_epsilon: self.max_epsilon,
            ..PrivacyPolicy::default()
        };
        let default_retention = Retention::default();
        c.retention = Retention {
            max_age: match self.retention_days {
                None => default_retention.max_age,
                Some(0) => None,
                Some(d) => Some(Duration::from_secs(u64::from(d) * 86_400)),
            },
            max_events: match self.max_events {
                None => default_retention.max_events,
                Some(0) => None,
                Some(n) => Some(n),
            },
        };
        if let Some(n) = self.min_personal_events {
            c.min_personal_events = n as usize;
        }
        if let Some(ms) = self.response_timeout_ms {
            if ms == 0 {
                return Err(StarlingError::invalid_config("response_timeout_ms must be above 0"));
            }
            c.response_timeout = Duration::from_millis(ms);
        }
        if let Some(attempts) = self.connect_attempts {
            if attempts == 0 {
                return Err(StarlingError::invalid_config("connect_attempts must be at least 1"));
            }
            c.retry = RetryPolicy { attempts, ..RetryPolicy::default() };
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> DeviceConfig {
        serde_json::from_str(
            r#"{"client_id": 7, "credential": "t", "model_family": "bpr-mf", "items": 50, "dim": 8}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_minimal_json_config_gets_the_sdk_defaults() {
        let c = base().to_client_config().unwrap();
        let d = ClientConfig::new(ClientId(7), b"t".to_vec(), ModelSpec::mf(50, 8), Storage::InMemory);
        assert_eq!(c, d);
    }

    #[test]
    fn unusable_settings_are_refused_with_a_config_error() {
        type Edit = Box<dyn Fn(&mut DeviceConfig)>;
        let cases: Vec<Edit> = vec![
            Box::new(|c| c.model_family = "resnet".into()),
            Box::new(|c| c.storage_key = Some(vec![1; 31])),
            Box::new(|c| c.storage_dir = Some(String::new())),
            Box::new(|c| c.local_dp_min_noise_multiplier = Some(f64::NAN)),
            Box::new(|c| c.local_dp_min_noise_multiplier = Some(0.0)),
            Box::new(|c| c.connect_attempts = Some(0)),
            Box::new(|c| c.response_timeout_ms = Some(0)),
            Box::new(|c| {
                c.coordinator = Some(CoordinatorConfig {
                    address: "x:1".into(),
                    server_name: "x".into(),
                    ca_pem: " ".into(),
                })
            }),
        ];
        for (i, edit) in cases.iter().enumerate() {
            let mut c = base();
            edit(&mut c);
            assert!(
                matches!(c.to_client_config(), Err(StarlingError::InvalidConfig { .. })),
                "case {i} was accepted"
            );
        }
    }

    #[test]
    fn zero_retention_means_no_limit_and_local_dp_is_kept() {
        let mut c = base();
        c.retention_days = Some(0);
        c.max_events = Some(0);
        c.local_dp_min_noise_multiplier = Some(1.5);
        let cc = c.to_client_config().unwrap();
        assert_eq!(cc.retention, Retention { max_age: None, max_events: None });
        assert_eq!(cc.privacy.mode, PrivacyMode::Local { min_noise_multiplier: 1.5 });
    }
}
