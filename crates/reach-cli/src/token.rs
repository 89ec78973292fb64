//! `reach token`: mints an access token the way the helper libraries' `AccessToken` +
//! `ChatGrant` do (and `reachd token`, `reach_gateway::auth::mint_token`): a JWT signed HS256
//! with the API key's secret, header `{"typ":"JWT","alg":"HS256","cty":"twilio-fpa;v=1"}`,
//! claims `jti` = `<key SID>-<now>`, `iss`, `sub`, `exp`, `grants` = `{identity, chat}`.

use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// Longest lifetime the gateway accepts.
pub const MAX_TTL_S: i64 = 24 * 3600;

/// What a token is minted from.
#[derive(Debug, Clone)]
pub struct TokenSpec<'a> {
    pub account_sid: &'a str,
    pub key_sid: &'a str,
    pub secret: &'a str,
    pub service_sid: &'a str,
    pub identity: &'a str,
    pub ttl_s: i64,
}

/// True for two given uppercase letters followed by 32 lowercase hex digits.
fn is_sid(s: &str, prefix: &str) -> bool {
    s.len() == 34
        && s.starts_with(prefix)
        && s[2..]
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

impl TokenSpec<'_> {
    /// Checks every input, naming the option at fault.
    pub fn validate(&self) -> Result<(), String> {
        let sid = |value: &str, option: &str, prefix: &str| {
            if is_sid(value, prefix) {
                Ok(())
            } else {
                Err(format!(
                    "{option} must be {prefix} followed by 32 lowercase hex digits, got {value:?}"
                ))
            }
        };
        sid(self.account_sid, "--account", "AC")?;
        sid(self.key_sid, "--key", "SK")?;
        sid(self.service_sid, "--service", "IS")?;
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
        Ok(())
    }

    /// The signed token, valid from `now` (unix seconds) for `ttl_s` seconds.
    pub fn mint(&self, now: i64) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        header.cty = Some("twilio-fpa;v=1".into());
        let claims = serde_json::json!({
            "jti": format!("{}-{now}", self.key_sid),
            "iss": self.key_sid,
            "sub": self.account_sid,
            "exp": now + self.ttl_s,
            "grants": {
                "identity": self.identity,
                "chat": {"service_sid": self.service_sid},
            },
        });
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .expect("HS256 encoding cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

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
        let token = spec().mint(1_700_000_000);
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
