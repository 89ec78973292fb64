//! Who may do what: accounts and API keys, HTTP Basic for REST, and access tokens (JWT, HS256)
//! for sockets, in the format the official helper libraries mint.
//!
//! Token checks, in order: the header names HS256; the `iss` claim names a known API key;
//! the signature verifies with that key's secret; `exp` is present, not past and at most 24 h
//! ahead; `nbf`, if present, is not in the future; `sub` is the key's account; the grant names
//! an identity and a service (`chat`, or the legacy `ip_messaging`). The caller then checks that
//! the service exists and belongs to that account.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use reach_proto::token::{AccessToken, Claims};
use reach_proto::{AccountSid, ApiKeySid, ErrorCode, ServiceSid, sid::looks_like_sid};
use serde::{Deserialize, Serialize};

use crate::config::{AccountConfig, ApiKeyConfig, Config};

/// Longest identity accepted in a token (and in `subscribe`).
pub const MAX_IDENTITY_LEN: usize = 256;

/// The accounts and API keys this gateway knows.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    accounts: HashMap<String, AccountConfig>,
    keys: HashMap<String, ApiKeyConfig>,
}

/// The principal a REST request authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub account_sid: AccountSid,
}

impl Credentials {
    pub fn new(accounts: &[AccountConfig], keys: &[ApiKeyConfig]) -> Self {
        Credentials {
            accounts: accounts
                .iter()
                .map(|a| (a.sid.to_string(), a.clone()))
                .collect(),
            keys: keys
                .iter()
                .map(|k| (k.sid.to_string(), k.clone()))
                .collect(),
        }
    }

    /// HTTP Basic: account SID + auth token, or API key SID + secret.
    pub fn basic(&self, header: Option<&str>) -> Option<Principal> {
        let encoded = header?
            .strip_prefix("Basic ")
            .or_else(|| header?.strip_prefix("basic "))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        if let Some(account) = self.accounts.get(user) {
            return constant_time_eq(&account.auth_token, password).then(|| Principal {
                account_sid: account.sid.clone(),
            });
        }
        let key = self.keys.get(user)?;
        constant_time_eq(&key.secret, password).then(|| Principal {
            account_sid: key.account_sid.clone(),
        })
    }

    pub fn key(&self, sid: &str) -> Option<&ApiKeyConfig> {
        self.keys.get(sid)
    }

    /// The auth token of an account (webhooks are signed with it).
    pub fn auth_token(&self, account_sid: &str) -> Option<&str> {
        self.accounts
            .get(account_sid)
            .map(|a| a.auth_token.as_str())
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    // Lengths are not secret (every token of a kind has the same); the bytes are compared in
    // constant time.
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Why a token was refused. Each maps to an error code and a metric label; the socket is
/// closed with 4001.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token is not a valid JWT")]
    Malformed,
    #[error("the access token must be signed with HS256")]
    Algorithm,
    #[error("the access token names an unknown API key")]
    UnknownKey,
    #[error("the access token signature is invalid")]
    Signature,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token expires more than 24 hours from now")]
    TooLong,
    #[error("the access token is not valid yet")]
    NotYetValid,
    #[error("the access token's account does not own its API key or service")]
    WrongAccount,
    #[error("the access token has no chat grant with an identity and a service SID")]
    Grant,
    #[error(
        "the access token's identity looks like a SID or is longer than {MAX_IDENTITY_LEN} bytes"
    )]
    BadIdentity,
    #[error("the access token's service does not exist")]
    UnknownService,
    #[error("the new token is for another identity or service")]
    OtherPrincipal,
}

impl TokenError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Malformed => ErrorCode::InvalidAccessToken,
            TokenError::Algorithm | TokenError::Signature => ErrorCode::InvalidSignature,
            TokenError::UnknownKey | TokenError::WrongAccount | TokenError::UnknownService => {
                ErrorCode::InvalidIssuer
            }
            TokenError::Expired | TokenError::TooLong => ErrorCode::TokenExpired,
            TokenError::NotYetValid => ErrorCode::TokenNotYetValid,
            TokenError::Grant => ErrorCode::InvalidGrant,
            TokenError::BadIdentity => ErrorCode::IdentityLooksLikeSid,
            TokenError::OtherPrincipal => ErrorCode::Forbidden,
        }
    }

    /// Whether the token failed before its signature was proven (unreadable, another
    /// algorithm, an unknown key, a bad signature): such a failure may be a guess, and counts
    /// against its address (`limits.auth_failures_per_minute`). An expired token or a
    /// foreign service, signed with a real key, is an honest client's mistake.
    pub fn is_unproven(&self) -> bool {
        matches!(
            self,
            TokenError::Malformed
                | TokenError::Algorithm
                | TokenError::UnknownKey
                | TokenError::Signature
        )
    }

    /// Label of `reach_auth_failures_total`.
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::TooLong => "lifetime",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAccount => "wrong_account",
            TokenError::Grant => "grant",
            TokenError::BadIdentity => "identity",
            TokenError::UnknownService => "unknown_service",
            TokenError::OtherPrincipal => "other_principal",
        }
    }
}

#[derive(Debug, Deserialize)]
struct IssuerOnly {
    iss: Option<String>,
}

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub account_sid: AccountSid,
    pub identity: String,
    pub service_sid: ServiceSid,
    pub push_credential_sid: Option<String>,
    pub expires_at: i64,
}

/// Verifies an access token at time `now` (unix seconds). See the module doc for the checks.
pub fn verify_token(creds: &Credentials, token: &str, now: i64) -> Result<TokenGrant, TokenError> {
    // Each part is decoded once, and the claims read once when they are whole (every `hello`
    // pays this): the header, the claims (unverified: their issuer names the key), the
    // signature over `header.payload` with that key. The refusals come in the module doc's
    // order whatever the token holds.
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
    if header.alg != Algorithm::HS256 {
        return Err(TokenError::Algorithm);
    }
    let (message, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (_, payload) = message.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let claims = serde_json::from_slice::<Claims>(&payload);
    let iss = match &claims {
        Ok(claims) => claims.iss.clone(),
        // Claims that are not whole still name their key: a bad signature is told as one.
        Err(_) => serde_json::from_slice::<IssuerOnly>(&payload)
            .ok()
            .and_then(|c| c.iss)
            .ok_or(TokenError::Malformed)?,
    };
    let key = creds.key(&iss).ok_or(TokenError::UnknownKey)?;
    let secret = DecodingKey::from_secret(key.secret.as_bytes());
    match jsonwebtoken::crypto::verify(signature, message.as_bytes(), &secret, Algorithm::HS256) {
        Ok(true) => {}
        Ok(false) => return Err(TokenError::Signature),
        Err(_) => return Err(TokenError::Malformed),
    }
    let claims = claims.map_err(|_| TokenError::Malformed)?;
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    if claims.exp > now + reach_proto::token::MAX_LIFETIME_S {
        return Err(TokenError::TooLong);
    }
    if claims.nbf.is_some_and(|nbf| nbf > now) {
        return Err(TokenError::NotYetValid);
    }
    if key.account_sid != claims.sub {
        return Err(TokenError::WrongAccount);
    }
    let identity = claims
        .grants
        .identity
        .filter(|i| !i.is_empty())
        .ok_or(TokenError::Grant)?;
    if looks_like_sid(&identity) || identity.len() > MAX_IDENTITY_LEN {
        return Err(TokenError::BadIdentity);
    }
    let chat = claims
        .grants
        .chat
        .or(claims.grants.ip_messaging)
        .ok_or(TokenError::Grant)?;
    let service_sid = chat
        .service_sid
        .and_then(|s| ServiceSid::parse(&s).ok())
        .ok_or(TokenError::Grant)?;
    Ok(TokenGrant {
        account_sid: key.account_sid.clone(),
        identity,
        service_sid,
        push_credential_sid: chat.push_credential_sid,
        expires_at: claims.exp,
    })
}

/// Mints a token as the helper libraries' `AccessToken` + `ChatGrant` do, signed with `key`.
pub fn mint_token(
    key: &ApiKeyConfig,
    service_sid: &ServiceSid,
    identity: &str,
    ttl_s: i64,
    now: i64,
) -> String {
    AccessToken {
        account_sid: key.account_sid.clone(),
        api_key_sid: key.sid.clone(),
        service_sid: service_sid.clone(),
        identity: identity.to_owned(),
        ttl_s,
    }
    .mint(&key.secret, now)
}

/// Account and API key generated on first start, kept in the data folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratedCredentials {
    pub account: AccountConfig,
    pub api_key: ApiKeyConfig,
}

impl GeneratedCredentials {
    pub fn path(config: &Config) -> PathBuf {
        config.data_dir().join("credentials.toml")
    }

    /// Reads the file, or `None` if it does not exist.
    pub fn read(path: &Path) -> std::io::Result<Option<GeneratedCredentials>> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml_from_str(&text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Generates a new account and API key and writes them (mode 0600) atomically.
    pub fn generate(path: &Path) -> std::io::Result<GeneratedCredentials> {
        let account_sid = AccountSid::generate();
        let creds = GeneratedCredentials {
            account: AccountConfig {
                sid: account_sid.clone(),
                auth_token: random_secret(),
            },
            api_key: ApiKeyConfig {
                sid: ApiKeySid::generate(),
                secret: random_secret(),
                account_sid,
            },
        };
        if let Some(dir) = path.parent() {
            // As the store does: a data folder made here is the owner's alone.
            let mut folder = std::fs::DirBuilder::new();
            folder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut folder, 0o700);
            folder.create(dir)?;
        }
        let text = format!(
            "# Generated by reachd on first start. Keep this file secret.\n\
             [account]\nsid = \"{}\"\nauth_token = \"{}\"\n\n\
             [api_key]\nsid = \"{}\"\nsecret = \"{}\"\naccount_sid = \"{}\"\n",
            creds.account.sid,
            creds.account.auth_token,
            creds.api_key.sid,
            creds.api_key.secret,
            creds.api_key.account_sid
        );
        let tmp = path.with_extension("toml.tmp");
        {
            use std::io::Write;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(creds)
    }
}

fn toml_from_str(text: &str) -> std::io::Result<GeneratedCredentials> {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

fn random_secret() -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const NOW: i64 = 1_800_000_000;

    fn creds() -> (Credentials, ApiKeyConfig) {
        let account = AccountConfig {
            sid: "AC0123456789abcdef0123456789abcdef".parse().unwrap(),
            auth_token: "test-fixture-auth-token".into(),
        };
        let key = ApiKeyConfig {
            sid: "SK0123456789abcdef0123456789abcdef".parse().unwrap(),
            secret: "test-fixture-secret".into(),
            account_sid: account.sid.clone(),
        };
        (
            Credentials::new(&[account], std::slice::from_ref(&key)),
            key,
        )
    }

    const SVC: &str = "IS0123456789abcdef0123456789abcdef";

    fn sign(claims: &serde_json::Value, secret: &str, alg: Algorithm) -> String {
        let mut header = Header::new(alg);
        header.cty = Some("twilio-fpa;v=1".into());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn claims(exp: i64) -> serde_json::Value {
        serde_json::json!({
            "jti": format!("SK0123456789abcdef0123456789abcdef-{NOW}"),
            "iss": "SK0123456789abcdef0123456789abcdef",
            "sub": "AC0123456789abcdef0123456789abcdef",
            "exp": exp,
            "grants": {"identity": "alice", "chat": {"service_sid": SVC}}
        })
    }

    #[test]
    fn minted_tokens_verify() {
        let (c, key) = creds();
        let t = mint_token(&key, &SVC.parse().unwrap(), "alice", 3600, NOW);
        let g = verify_token(&c, &t, NOW).unwrap();
        assert_eq!(
            (g.identity.as_str(), g.service_sid.as_str(), g.expires_at),
            ("alice", SVC, NOW + 3600)
        );
    }

    #[test]
    fn refusals_have_their_own_reasons() {
        let (c, _) = creds();
        let ok = claims(NOW + 60);
        assert!(verify_token(&c, &sign(&ok, "test-fixture-secret", Algorithm::HS256), NOW).is_ok());
        assert_eq!(
            verify_token(&c, &sign(&ok, "wrong-secret", Algorithm::HS256), NOW),
            Err(TokenError::Signature)
        );
        assert_eq!(
            verify_token(&c, &sign(&ok, "test-fixture-secret", Algorithm::HS512), NOW),
            Err(TokenError::Algorithm)
        );
        assert_eq!(
            verify_token(
                &c,
                &sign(&claims(NOW), "test-fixture-secret", Algorithm::HS256),
                NOW
            ),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify_token(
                &c,
                &sign(
                    &claims(NOW + 24 * 3600 + 1),
                    "test-fixture-secret",
                    Algorithm::HS256
                ),
                NOW
            ),
            Err(TokenError::TooLong)
        );
        let mut nbf = ok.clone();
        nbf["nbf"] = serde_json::json!(NOW + 10);
        assert_eq!(
            verify_token(
                &c,
                &sign(&nbf, "test-fixture-secret", Algorithm::HS256),
                NOW
            ),
            Err(TokenError::NotYetValid)
        );
        let mut other = ok.clone();
        other["iss"] = serde_json::json!("SK00000000000000000000000000000000");
        assert_eq!(
            verify_token(
                &c,
                &sign(&other, "test-fixture-secret", Algorithm::HS256),
                NOW
            ),
            Err(TokenError::UnknownKey)
        );
        let mut sub = ok.clone();
        sub["sub"] = serde_json::json!("AC00000000000000000000000000000000");
        assert_eq!(
            verify_token(
                &c,
                &sign(&sub, "test-fixture-secret", Algorithm::HS256),
                NOW
            ),
            Err(TokenError::WrongAccount)
        );
        let mut legacy = ok.clone();
        legacy["grants"] =
            serde_json::json!({"identity": "bob", "ip_messaging": {"service_sid": SVC}});
        assert_eq!(
            verify_token(
                &c,
                &sign(&legacy, "test-fixture-secret", Algorithm::HS256),
                NOW
            )
            .unwrap()
            .identity,
            "bob"
        );
        let mut nogrant = ok;
        nogrant["grants"] = serde_json::json!({"identity": "bob"});
        assert_eq!(
            verify_token(
                &c,
                &sign(&nogrant, "test-fixture-secret", Algorithm::HS256),
                NOW
            ),
            Err(TokenError::Grant)
        );
        assert_eq!(
            verify_token(&c, "not.a.jwt", NOW),
            Err(TokenError::Malformed)
        );
        let mut sidlike = claims(NOW + 60);
        sidlike["grants"]["identity"] = serde_json::json!("US0123456789abcdef0123456789abcdef");
        assert_eq!(
            verify_token(
                &c,
                &sign(&sidlike, "test-fixture-secret", Algorithm::HS256),
                NOW
            ),
            Err(TokenError::BadIdentity)
        );
    }

    /// The refusals of tokens that are not whole come in the module doc's order too: the
    /// algorithm before the claims, the key and the signature before claims that do not read
    /// as a grant, and a part that is not base64 is malformed.
    #[test]
    fn broken_tokens_are_refused_in_order() {
        let (c, _) = creds();
        let secret = "test-fixture-secret";
        let mut partial = claims(NOW + 60);
        partial.as_object_mut().unwrap().remove("grants");
        assert_eq!(
            verify_token(&c, &sign(&partial, secret, Algorithm::HS256), NOW),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify_token(&c, &sign(&partial, "wrong-secret", Algorithm::HS256), NOW),
            Err(TokenError::Signature)
        );
        assert_eq!(
            verify_token(&c, &sign(&partial, secret, Algorithm::HS384), NOW),
            Err(TokenError::Algorithm)
        );
        let mut keyless = claims(NOW + 60);
        keyless.as_object_mut().unwrap().remove("iss");
        assert_eq!(
            verify_token(&c, &sign(&keyless, secret, Algorithm::HS256), NOW),
            Err(TokenError::Malformed)
        );
        partial["iss"] = serde_json::json!("SK00000000000000000000000000000000");
        assert_eq!(
            verify_token(&c, &sign(&partial, secret, Algorithm::HS256), NOW),
            Err(TokenError::UnknownKey)
        );
        let good = sign(&claims(NOW + 60), secret, Algorithm::HS256);
        let (message, _) = good.rsplit_once('.').unwrap();
        assert_eq!(
            verify_token(&c, &format!("{message}.not*base64"), NOW),
            Err(TokenError::Malformed)
        );
        let (header, _) = message.split_once('.').unwrap();
        assert_eq!(
            verify_token(&c, &format!("{header}.e30*.sig"), NOW),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify_token(&c, &format!("x.{good}"), NOW),
            Err(TokenError::Malformed)
        );
        assert!(verify_token(&c, &good, NOW).is_ok());
    }

    #[test]
    fn basic_auth_accepts_account_and_key() {
        let (c, _) = creds();
        let b = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        let acct = "AC0123456789abcdef0123456789abcdef";
        assert!(c.basic(Some(&b(acct, "test-fixture-auth-token"))).is_some());
        assert!(
            c.basic(Some(&b(
                "SK0123456789abcdef0123456789abcdef",
                "test-fixture-secret"
            )))
            .is_some()
        );
        assert!(c.basic(Some(&b(acct, "nope"))).is_none());
        assert!(c.basic(None).is_none());
        assert!(c.basic(Some("Bearer x")).is_none());
    }
}
