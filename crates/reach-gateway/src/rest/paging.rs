//! Paging of list routes, as the hosted API pages: `PageSize`, `Page` and `PageToken` in,
//! `{"<key>": [...], "meta": {...}}` out, with absolute `first_page_url`, `previous_page_url`,
//! `url` and `next_page_url` that keep the list's filters. `PageToken` is a keyset cursor
//! (`PT<seq>`), so following `next_page_url` never skips or repeats a row.

use axum::Json;
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reach_store::{Page, PageRequest};
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use super::extract::Params;

/// Rows per page when `PageSize` is not given.
const DEFAULT_PAGE_SIZE: i64 = 50;
/// Largest `PageSize` accepted.
const MAX_PAGE_SIZE: i64 = 1000;
/// Largest `Page` accepted: its offset fits in an `i64` at any page size.
const MAX_PAGE: i64 = i64::MAX / MAX_PAGE_SIZE;
/// What a filter value keeps unescaped in a paging URL: RFC 3986's unreserved characters.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `PageSize`, `Page` and `PageToken` of a list request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Paging {
    pub size: i64,
    page: i64,
    /// The keyset cursor from `PageToken` (`PT<cursor>`).
    cursor: Option<i64>,
}

impl Paging {
    pub fn parse(params: &Params) -> ApiResult<Paging> {
        let size = match params.get("PageSize") {
            None => DEFAULT_PAGE_SIZE,
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "PageSize must be an integer between 1 and {MAX_PAGE_SIZE}, got {v:?}"
                    ))
                })?,
        };
        let page = match params.get("Page") {
            None => 0,
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| (0..=MAX_PAGE).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "Page must be an integer between 0 and {MAX_PAGE}, got {v:?}"
                    ))
                })?,
        };
        let cursor = match params.get("PageToken") {
            None => None,
            Some(v) => Some(
                v.strip_prefix("PT")
                    .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or_else(|| ApiError::invalid(format!("PageToken {v:?} is not valid")))?,
            ),
        };
        Ok(Paging { size, page, cursor })
    }

    pub fn request(&self) -> PageRequest {
        match self.cursor {
            Some(after) => PageRequest {
                after: Some(after),
                offset: 0,
                limit: self.size,
            },
            None => PageRequest {
                after: None,
                offset: self.page * self.size,
                limit: self.size,
            },
        }
    }

    /// The envelope of one page: `{"<key>": [...], "meta": {...}}`. `list_url` is the list's
    /// absolute URL; `filters` are kept in every paging URL.
    fn envelope<'a, T: Serialize>(
        &self,
        key: &'a str,
        page: Page<T>,
        list_url: &str,
        filters: &[(&str, String)],
    ) -> Envelope<'a, T> {
        let url = |page: i64, cursor: Option<i64>| {
            let mut query: Vec<String> = filters
                .iter()
                .map(|(name, value)| format!("{name}={}", utf8_percent_encode(value, UNRESERVED)))
                .collect();
            query.push(format!("PageSize={}", self.size));
            query.push(format!("Page={page}"));
            if let Some(cursor) = cursor {
                query.push(format!("PageToken=PT{cursor}"));
            }
            format!("{list_url}?{}", query.join("&"))
        };
        Envelope {
            key,
            meta: Meta {
                page: self.page,
                page_size: self.size,
                first_page_url: url(0, None),
                previous_page_url: (self.page > 0).then(|| url(self.page - 1, None)),
                url: url(self.page, self.cursor),
                next_page_url: page
                    .next_cursor
                    .map(|c| url(self.page.saturating_add(1), Some(c))),
                key,
            },
            items: page.items,
        }
    }
}

/// `{"<key>": [...], "meta": {...}}`.
struct Envelope<'a, T> {
    key: &'a str,
    items: Vec<T>,
    meta: Meta<'a>,
}

impl<T: Serialize> Serialize for Envelope<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry(self.key, &self.items)?;
        map.serialize_entry("meta", &self.meta)?;
        map.end()
    }
}

#[derive(Serialize)]
struct Meta<'a> {
    page: i64,
    page_size: i64,
    first_page_url: String,
    previous_page_url: Option<String>,
    url: String,
    next_page_url: Option<String>,
    key: &'a str,
}

/// A list page as its JSON envelope.
pub(super) fn list_response<T: Serialize>(
    paging: &Paging,
    key: &str,
    page: Page<T>,
    list_url: &str,
    filters: &[(&str, String)],
) -> Response {
    Json(paging.envelope(key, page, list_url, filters)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_rejects_bad_values() {
        let parse = |q: &str| Paging::parse(&Params::parse(q.as_bytes(), "query").unwrap());
        assert_eq!(parse("").unwrap().size, 50);
        for bad in [
            "PageSize=0",
            "PageSize=1001",
            "PageSize=x",
            "Page=-1",
            "Page=1.5",
            "PageToken=x",
            "PageToken=PT",
            "PageToken=PT-1",
            "Page=9223372036854775807&PageSize=2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let p = parse("PageSize=2&Page=3&PageToken=PT17").unwrap();
        assert_eq!(
            p.request(),
            PageRequest {
                after: Some(17),
                offset: 0,
                limit: 2
            }
        );
        let p = parse("PageSize=2&Page=3").unwrap();
        assert_eq!(
            p.request(),
            PageRequest {
                after: None,
                offset: 6,
                limit: 2
            }
        );
    }

    #[test]
    fn filters_in_paging_urls_escape_all_but_unreserved_characters() {
        let paging = Paging::parse(&Params::default()).unwrap();
        let page = Page::<u8> {
            items: vec![],
            next_cursor: None,
        };
        let filters = [("Identity", "al ice/ü~.-_".to_owned())];
        let env = paging.envelope("users", page, "http://h/v1/Services/IS1/Users", &filters);
        assert_eq!(
            env.meta.url,
            "http://h/v1/Services/IS1/Users?Identity=al%20ice%2F%C3%BC~.-_&PageSize=50&Page=0"
        );
    }
}
