//! What the resources' JSON shapes share: absolute URLs ([`Urls`]) and timestamps
//! ([`iso8601`]). Each shape is in its resource's file.

/// `2026-11-25T20:43:04Z` (the store's writing, also that of webhook parameters).
pub(super) use reach_store::iso8601;

/// Builds absolute URLs.
pub(super) struct Urls<'a> {
    pub base: &'a str,
}

impl Urls<'_> {
    pub fn services(&self) -> String {
        format!("{}/v1/Services", self.base)
    }
    pub fn service(&self, sid: &str) -> String {
        format!("{}/v1/Services/{sid}", self.base)
    }
    pub fn config(&self, sid: &str) -> String {
        format!("{}/Configuration", self.service(sid))
    }
    pub fn users(&self, sid: &str) -> String {
        format!("{}/Users", self.service(sid))
    }
    pub fn user(&self, sid: &str, user_sid: &str) -> String {
        format!("{}/Users/{user_sid}", self.service(sid))
    }
    pub fn bindings(&self, sid: &str) -> String {
        format!("{}/Bindings", self.service(sid))
    }
    pub fn binding(&self, sid: &str, binding_sid: &str) -> String {
        format!("{}/Bindings/{binding_sid}", self.service(sid))
    }
    pub fn webhooks(&self, sid: &str) -> String {
        format!("{}/Webhooks", self.config(sid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_iso8601_utc_to_the_second() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_795_639_384), "2026-11-25T20:43:04Z");
    }
}
