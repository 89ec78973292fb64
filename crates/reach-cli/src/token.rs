//! `reach token`: mints an access token the way the helper libraries' `AccessToken` +
//! `ChatGrant` do (and `reachd token`): `reach_proto::token`, after checking every option.

use reach_proto::sid::SidError;
use reach_proto::token::{AccessToken, MAX_LIFETIME_S};
use reach_proto::{AccountSid, ApiKeySid, ServiceSid};

/// Longest lifetime the gateway accepts.
pub const MAX_TTL_S: i64 = MAX_LIFETIME_S;

/// What a token is minted from, as given on the command line.
#[derive(Debug, Clone)]
pub struct TokenSpec<'a> {
    pub account_sid: &'a str,
    pub key_sid: &'a str,
    pub secret: &'a str,
    pub service_sid: &'a str,
    pub identity: &'a str,
    pub ttl_s: i64,
}

impl TokenSpec<'_> {
    /// Checks every input, naming the option at fault; the token to sign.
    pub fn validate(&self) -> Result<AccessToken, String> {
        fn named(option: &'static str) -> impl Fn(SidError) -> String {
            move |e| format!("{option} {e}")
        }
        let account_sid = AccountSid::parse(self.account_sid).map_err(named("--account"))?;
        let api_key_sid = ApiKeySid::parse(self.key_sid).map_err(named("--key"))?;
        let service_sid = ServiceSid::parse(self.service_sid).map_err(named("--service"))?;
        if self.secret.is_empty() {
            return Err("--secret must not be empty".into());
        }
        if self.identity.is_empty() {
            return Err("--identity must not be empty".into());
        }
        if !(1..=MAX_TTL_S).contains(&self.ttl_s) {
            return Err(format!(
                "--ttl must be between 1 and {MAX_TTL_S} seconds, got {}",
                self.ttl_s
            ));
        }
        Ok(AccessToken {
            account_sid,
            api_key_sid,
            service_sid,
            identity: self.identity.to_owned(),
            ttl_s: self.ttl_s,
        })
    }

    /// The signed token, valid from `now` (unix seconds) for `ttl_s` seconds.
    pub fn mint(&self, now: i64) -> Result<String, String> {
        Ok(self.validate()?.mint(self.secret, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    const AC: &str = "AC0123456789abcdef0123456789abcdef";
    const SK: &str = "SK0123456789abcdef0123456789abcdef";
    const IS: &str = "IS0123456789abcdef0123456789abcdef";

    fn spec() -> TokenSpec<'static> {
        TokenSpec {
            account_sid: AC,
            key_sid: SK,
            secret: "a secret of some length",
            service_sid: IS,
            identity: "alice",
            ttl_s: 3600,
        }
    }

    #[test]
    fn minted_tokens_have_the_helper_library_shape() {
        let token = spec().mint(1_700_000_000).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.cty.as_deref(), Some("twilio-fpa;v=1"));
        let mut v = Validation::new(Algorithm::HS256);
        v.validate_exp = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(b"a secret of some length"),
            &v,
        )
        .unwrap();
        assert_eq!(
            data.claims,
            serde_json::json!({"jti": format!("{SK}-1700000000"), "iss": SK, "sub": AC,
                "exp": 1_700_003_600i64,
                "grants": {"identity": "alice", "chat": {"service_sid": IS}}})
        );
    }

    #[test]
    fn bad_inputs_name_the_option() {
        assert!(spec().validate().is_ok());
        let cases = [
            (
                TokenSpec {
                    account_sid: "AC123",
                    ..spec()
                },
                "--account",
            ),
            (
                TokenSpec {
                    key_sid: AC,
                    ..spec()
                },
                "--key",
            ),
            (
                TokenSpec {
                    service_sid: "IS0123456789ABCDEF0123456789ABCDEF",
                    ..spec()
                },
                "--service",
            ),
            (
                TokenSpec {
                    secret: "",
                    ..spec()
                },
                "--secret",
            ),
            (
                TokenSpec {
                    identity: "",
                    ..spec()
                },
                "--identity",
            ),
            (TokenSpec { ttl_s: 0, ..spec() }, "--ttl"),
            (
                TokenSpec {
                    ttl_s: MAX_TTL_S + 1,
                    ..spec()
                },
                "--ttl",
            ),
        ];
        for (s, option) in cases {
            let e = s.validate().unwrap_err();
            assert!(e.starts_with(option), "{e}");
        }
    }
}
