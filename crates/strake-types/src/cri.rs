//! The CRI `runtime.v1` API, generated from `proto/runtime/v1/api.proto`.
//!
//! `runtime_service_client`/`runtime_service_server` and `image_service_client`/
//! `image_service_server` hold the gRPC halves; every message is a prost struct.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("runtime.v1");

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("password", &redact(&self.password))
            .field("auth", &redact(&self.auth))
            .field("server_address", &self.server_address)
            .field("identity_token", &redact(&self.identity_token))
            .field("registry_token", &redact(&self.registry_token))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_config_debug_hides_secrets() {
        let auth = AuthConfig {
            username: "user".into(),
            password: "hunter2".into(),
            auth: "dXNlcjpodW50ZXIy".into(),
            registry_token: "tok".into(),
            ..Default::default()
        };
        let text = format!("{auth:?}");
        assert!(text.contains("user"), "{text}");
        for secret in ["hunter2", "dXNlcjpodW50ZXIy", "tok\""] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}
