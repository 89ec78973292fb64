//! Access tokens: the JWT a client presents in `hello` and `update_token`, in the format the
//! hosted service's helper libraries mint (`AccessToken` with a `ChatGrant`).
//!
//! A token is signed HS256 with an API key's secret; its header carries `typ: JWT` and
//! `cty: twilio-fpa;v=1`; its [`Claims`] are `jti` (`<key SID>-<issued at>`), `iss` (the API
//! key SID), `sub` (the account SID), `exp`, an optional `nbf`, and `grants`: the `identity`
//! and a `chat` grant naming the service (`ip_messaging` is the legacy name of the same grant).
//!
//! [`AccessToken::mint`] makes one (for `reachd token`, `reach token` and the load-test
//! harness); the gateway decodes [`Claims`] when it verifies one, with its own checks of the
//! issuer, expiry and grant. Needs the `token` feature.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::sid::{AccountSid, ApiKeySid, ServiceSid};

/// The longest lifetime a gateway accepts for an access token.
pub const MAX_LIFETIME_S: i64 = 24 * 3600;

/// The `chat` grant (or its legacy name `ip_messaging`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatGrant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_sid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_credential_sid: Option<String>,
}

/// The `grants` claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatGrant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_messaging: Option<ChatGrant>,
}

/// The claims of an access token, as minted and as decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub jti: String,
    /// The API key SID whose secret signs the token.
    pub iss: String,
    /// The account SID that owns the key.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Not valid before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub grants: Grants,
}

/// What an access token is minted for: one identity in one service, signed by one API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub account_sid: AccountSid,
    pub api_key_sid: ApiKeySid,
    pub service_sid: ServiceSid,
    pub identity: String,
    /// Lifetime in seconds from the moment it is minted.
    pub ttl_s: i64,
}

impl AccessToken {
    /// The signed token, issued at `now` (unix seconds), signed with the API key's `secret`.
    pub fn mint(&self, secret: &str, now: i64) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        header.cty = Some("twilio-fpa;v=1".into());
        let claims = Claims {
            jti: format!("{}-{now}", self.api_key_sid),
            iss: self.api_key_sid.to_string(),
            sub: self.account_sid.to_string(),
            exp: now + self.ttl_s,
            nbf: None,
            grants: Grants {
                identity: Some(self.identity.clone()),
                chat: Some(ChatGrant {
                    service_sid: Some(self.service_sid.to_string()),
                    ..ChatGrant::default()
                }),
                ip_messaging: None,
            },
        };
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("HS256 encoding cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn minted_tokens_have_the_helper_library_shape() {
        let token = AccessToken {
            account_sid: "AC0123456789abcdef0123456789abcdef".parse().unwrap(),
            api_key_sid: "SK0123456789abcdef0123456789abcdef".parse().unwrap(),
            service_sid: "IS0123456789abcdef0123456789abcdef".parse().unwrap(),
            identity: "alice".into(),
            ttl_s: 600,
        }
        .mint("test-fixture-secret", 1_700_000_000);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.cty.as_deref(), Some("twilio-fpa;v=1"));
        let mut v = Validation::new(Algorithm::HS256);
        v.validate_exp = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(b"test-fixture-secret"),
            &v,
        )
        .unwrap();
        assert_eq!(
            data.claims,
            serde_json::json!({
                "jti": "SK0123456789abcdef0123456789abcdef-1700000000",
                "iss": "SK0123456789abcdef0123456789abcdef",
                "sub": "AC0123456789abcdef0123456789abcdef",
                "exp": 1_700_000_600i64,
                "grants": {"identity": "alice",
                           "chat": {"service_sid": "IS0123456789abcdef0123456789abcdef"}},
            })
        );
    }
}
