//! What the SQL backends share: error mapping, paging, and the mapping of rows to records (the
//! same column names in SQLite and PostgreSQL, read through [`Cols`]).

use reach_proto::sid::{Kind, Sid};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use crate::{Binding, Page, PageRequest, Service, ServiceConfig, StoreError, UserRecord};

/// Maps a sqlx error: a missing row is `NotFound`, anything else a backend failure.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        e => StoreError::Backend(e.to_string()),
    }
}

/// Like [`db`], but a foreign-key violation (the parent service or user is gone) is `NotFound`.
pub(crate) fn db_fk(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NotFound,
        _ => db(e),
    }
}

/// A page request made safe: `(after, offset, limit)`.
pub(crate) fn window(page: PageRequest) -> (i64, i64, i64) {
    let limit = page.limit.clamp(1, 1000);
    match page.after {
        Some(after) => (after, 0, limit),
        // seq starts at 1.
        None => (0, page.offset.max(0), limit),
    }
}

/// Maps up to `limit + 1` rows (each tagged with its `seq`) into a page: the extra row only
/// says there is a next page, whose cursor is the last kept row's `seq`.
pub(crate) fn page_of<R, T>(
    rows: &[R],
    map: fn(&R) -> sqlx::Result<(i64, T)>,
    limit: i64,
) -> crate::Result<Page<T>> {
    let limit = usize::try_from(limit).unwrap_or(0);
    let more = rows.len() > limit;
    let items = rows
        .iter()
        .take(limit)
        .map(map)
        .collect::<sqlx::Result<Vec<_>>>()
        .map_err(db)?;
    let next_cursor = if more {
        items.last().map(|(seq, _)| *seq)
    } else {
        None
    };
    Ok(Page {
        items: items.into_iter().map(|(_, item)| item).collect(),
        next_cursor,
    })
}

/// Typed column reads of a row of either backend.
pub(crate) trait Cols {
    fn int(&self, col: &str) -> sqlx::Result<i64>;
    fn text(&self, col: &str) -> sqlx::Result<String>;
    fn opt_text(&self, col: &str) -> sqlx::Result<Option<String>>;
    fn opt_int(&self, col: &str) -> sqlx::Result<Option<i64>>;
    fn flag(&self, col: &str) -> sqlx::Result<bool>;

    /// A SID of kind `K`; another shape is a decoding error (the store holds only SIDs it
    /// generated or checked).
    fn sid<K: Kind>(&self, col: &str) -> sqlx::Result<Sid<K>> {
        Sid::try_from(self.text(col)?).map_err(|e| sqlx::Error::ColumnDecode {
            index: col.to_owned(),
            source: Box::new(e),
        })
    }
}

macro_rules! cols_for {
    ($row:ty) => {
        impl Cols for $row {
            fn int(&self, col: &str) -> sqlx::Result<i64> {
                self.try_get(col)
            }
            fn text(&self, col: &str) -> sqlx::Result<String> {
                self.try_get(col)
            }
            fn opt_text(&self, col: &str) -> sqlx::Result<Option<String>> {
                self.try_get(col)
            }
            fn opt_int(&self, col: &str) -> sqlx::Result<Option<i64>> {
                self.try_get(col)
            }
            fn flag(&self, col: &str) -> sqlx::Result<bool> {
                self.try_get(col)
            }
        }
    };
}

cols_for!(SqliteRow);
cols_for!(PgRow);

pub(crate) fn service_row(row: &impl Cols) -> sqlx::Result<(i64, Service)> {
    Ok((
        row.int("seq")?,
        Service {
            sid: row.sid("sid")?,
            account_sid: row.sid("account_sid")?,
            friendly_name: row.text("friendly_name")?,
            date_created: row.int("date_created")?,
            date_updated: row.int("date_updated")?,
        },
    ))
}

pub(crate) fn config_row(row: &impl Cols) -> sqlx::Result<ServiceConfig> {
    Ok(ServiceConfig {
        service_sid: row.sid("service_sid")?,
        reachability_enabled: row.flag("reachability_enabled")?,
        reachability_epoch: row.int("reachability_epoch")?,
        default_conversation_creator_role_sid: row
            .opt_text("default_conversation_creator_role_sid")?,
        default_conversation_role_sid: row.opt_text("default_conversation_role_sid")?,
        default_chat_service_role_sid: row.opt_text("default_chat_service_role_sid")?,
    })
}

/// A user's columns, `u` its alias; `binding_count` counted from its bindings.
pub(crate) const USER_COLS: &str = "u.seq, u.sid, u.account_sid, u.service_sid, u.identity, \
     u.friendly_name, u.attributes, u.role_sid, u.date_created, u.date_updated, u.revision, \
     u.online_epoch, u.ever_had_binding, u.presence_online, u.last_seen_at, \
     (SELECT COUNT(*) FROM bindings b \
       WHERE b.service_sid = u.service_sid AND b.identity = u.identity) AS binding_count";

pub(crate) fn user_row(row: &impl Cols) -> sqlx::Result<(i64, UserRecord)> {
    Ok((
        row.int("seq")?,
        UserRecord {
            sid: row.text("sid")?,
            account_sid: row.sid("account_sid")?,
            service_sid: row.sid("service_sid")?,
            identity: row.text("identity")?,
            friendly_name: row.opt_text("friendly_name")?,
            attributes: row
                .opt_text("attributes")?
                .unwrap_or_else(|| "{}".to_owned()),
            role_sid: row.opt_text("role_sid")?,
            date_created: row.int("date_created")?,
            date_updated: row.int("date_updated")?,
            revision: row.int("revision")?,
            online_epoch: row.int("online_epoch")?,
            ever_had_binding: row.flag("ever_had_binding")?,
            binding_count: row.int("binding_count")?,
            presence_online: row.flag("presence_online")?,
            last_seen_at: row.opt_int("last_seen_at")?,
        },
    ))
}

pub(crate) fn binding_row(row: &impl Cols) -> sqlx::Result<(i64, Binding)> {
    Ok((
        row.int("seq")?,
        Binding {
            sid: row.text("sid")?,
            account_sid: row.sid("account_sid")?,
            service_sid: row.sid("service_sid")?,
            credential_sid: row.opt_text("credential_sid")?,
            identity: row.text("identity")?,
            binding_type: row.text("binding_type")?,
            address: row.text("address")?,
            date_created: row.int("date_created")?,
            date_updated: row.int("date_updated")?,
        },
    ))
}
