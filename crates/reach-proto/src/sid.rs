//! SIDs, the ids of Reach's resources, shaped as the hosted API shapes them: two capital
//! letters that name the kind (`IS` a service, `US` a user, ...) and 32 lowercase hex digits.
//!
//! This module is the one place that makes and checks them. [`SidKind`] names each kind with
//! its prefix; [`Sid<K>`] is a SID checked to be of kind `K`, the form in which SIDs cross crate
//! boundaries where a mix-up would be silent: the accounts and services of the store's records
//! and calls, an access token's account, key and service, the configured accounts and keys.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

/// The kinds of SID, each with its two-letter prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SidKind {
    /// `AC`: an account (HTTP Basic user, owner of services and API keys).
    Account,
    /// `SK`: an API key (signs access tokens, authenticates REST calls).
    ApiKey,
    /// `IS`: a conversations service.
    Service,
    /// `US`: a user of a service.
    User,
    /// `BS`: a push binding.
    Binding,
    /// `RL`: a role (stored, not enforced).
    Role,
    /// `CN`: one WebSocket connection (`welcome.connection_id`).
    Connection,
    /// `EV`: one webhook event (its `I-Twilio-Idempotency-Token`).
    Event,
}

impl SidKind {
    /// The two capital letters a SID of this kind starts with.
    pub const fn prefix(self) -> &'static str {
        match self {
            SidKind::Account => "AC",
            SidKind::ApiKey => "SK",
            SidKind::Service => "IS",
            SidKind::User => "US",
            SidKind::Binding => "BS",
            SidKind::Role => "RL",
            SidKind::Connection => "CN",
            SidKind::Event => "EV",
        }
    }

    /// A new random SID of this kind.
    pub fn generate(self) -> String {
        use rand::Rng;
        let n: u128 = rand::rng().random();
        format!("{}{n:032x}", self.prefix())
    }

    /// Whether `s` is a SID of this kind.
    pub fn is(self, s: &str) -> bool {
        s.starts_with(self.prefix()) && looks_like_sid(s)
    }

    /// What a SID of this kind looks like, for error messages: `AC followed by 32 lowercase
    /// hex digits`.
    pub fn expected(self) -> String {
        format!("{} followed by 32 lowercase hex digits", self.prefix())
    }

    /// `Ok` if `s` is a SID of this kind; else an error that says what one looks like.
    pub fn check(self, s: &str) -> Result<(), SidError> {
        if self.is(s) {
            Ok(())
        } else {
            Err(SidError {
                kind: self,
                value: s.to_owned(),
            })
        }
    }
}

/// True when `s` has the shape of a SID of any kind: two capital letters and 32 lowercase hex
/// digits. (An identity may not have this shape, so that a user path segment is never both.)
pub fn looks_like_sid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 34
        && b[0].is_ascii_uppercase()
        && b[1].is_ascii_uppercase()
        && b[2..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// A value that is not a SID of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be {}, got {value:?}", kind.expected())]
pub struct SidError {
    pub kind: SidKind,
    pub value: String,
}

/// The kind of a typed [`Sid`].
pub trait Kind {
    const KIND: SidKind;
}

/// Marker kinds of [`Sid`].
pub mod kind {
    use super::{Kind, SidKind};

    macro_rules! kinds {
        ($($name:ident),*) => {$(
            #[doc = concat!("Marker of [`super::Sid`]s of kind [`SidKind::", stringify!($name), "`].")]
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
            pub enum $name {}
            impl Kind for $name {
                const KIND: SidKind = SidKind::$name;
            }
        )*};
    }
    kinds!(Account, ApiKey, Service);
}

/// A SID checked to be of kind `K` (see [`AccountSid`], [`ApiKeySid`], [`ServiceSid`]).
pub struct Sid<K> {
    text: Box<str>,
    kind: PhantomData<fn() -> K>,
}

/// An account SID (`AC…`).
pub type AccountSid = Sid<kind::Account>;
/// An API key SID (`SK…`).
pub type ApiKeySid = Sid<kind::ApiKey>;
/// A service SID (`IS…`).
pub type ServiceSid = Sid<kind::Service>;

impl<K: Kind> Sid<K> {
    /// A new random SID of this kind.
    pub fn generate() -> Self {
        Sid::trusted(K::KIND.generate())
    }

    /// `s` as a SID of this kind, if it is one.
    pub fn parse(s: &str) -> Result<Self, SidError> {
        K::KIND.check(s)?;
        Ok(Sid::trusted(s.to_owned()))
    }
}

impl<K> Sid<K> {
    fn trusted(text: String) -> Self {
        Sid {
            text: text.into_boxed_str(),
            kind: PhantomData,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<K: Kind> TryFrom<String> for Sid<K> {
    type Error = SidError;

    fn try_from(text: String) -> Result<Self, SidError> {
        K::KIND.check(&text)?;
        Ok(Sid::trusted(text))
    }
}

impl<K: Kind> FromStr for Sid<K> {
    type Err = SidError;

    fn from_str(s: &str) -> Result<Self, SidError> {
        Sid::parse(s)
    }
}

impl<K> std::ops::Deref for Sid<K> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.text
    }
}

impl<K> AsRef<str> for Sid<K> {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl<K> Clone for Sid<K> {
    fn clone(&self) -> Self {
        Sid::trusted(self.text.to_string())
    }
}

impl<K> PartialEq for Sid<K> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<K> Eq for Sid<K> {}

impl<K> std::hash::Hash for Sid<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl<K> PartialEq<str> for Sid<K> {
    fn eq(&self, other: &str) -> bool {
        &*self.text == other
    }
}

impl<K> PartialEq<&str> for Sid<K> {
    fn eq(&self, other: &&str) -> bool {
        &*self.text == *other
    }
}

impl<K> PartialEq<String> for Sid<K> {
    fn eq(&self, other: &String) -> bool {
        *self.text == **other
    }
}

impl<K> PartialEq<Sid<K>> for str {
    fn eq(&self, other: &Sid<K>) -> bool {
        self == &*other.text
    }
}

impl<K> PartialEq<Sid<K>> for &str {
    fn eq(&self, other: &Sid<K>) -> bool {
        *self == &*other.text
    }
}

impl<K> PartialEq<Sid<K>> for String {
    fn eq(&self, other: &Sid<K>) -> bool {
        **self == *other.text
    }
}

impl<K> fmt::Display for Sid<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<K> fmt::Debug for Sid<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

impl<K> serde::Serialize for Sid<K> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de, K: Kind> serde::Deserialize<'de> for Sid<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Sid::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_sids_have_the_documented_shape() {
        for kind in [
            SidKind::Account,
            SidKind::ApiKey,
            SidKind::Service,
            SidKind::User,
            SidKind::Binding,
            SidKind::Role,
            SidKind::Connection,
            SidKind::Event,
        ] {
            let s = kind.generate();
            assert!(kind.is(&s), "{s}");
            assert!(looks_like_sid(&s), "{s}");
            assert!(!looks_like_sid(&s.to_uppercase()), "{s}");
        }
        assert!(!looks_like_sid("alice"));
    }

    #[test]
    fn a_typed_sid_refuses_another_kind() {
        let service = ServiceSid::generate();
        assert_eq!(service.parse::<ServiceSid>().unwrap(), service);
        let e = AccountSid::parse(&service).unwrap_err();
        assert_eq!(e.kind, SidKind::Account);
        assert!(
            e.to_string().starts_with("must be AC followed by 32"),
            "{e}"
        );
        assert!(ApiKeySid::parse("SK0123456789ABCDEF0123456789ABCDEF").is_err());
        assert!(ApiKeySid::parse("SK0123456789abcdef0123456789abcdef").is_ok());
    }
}
