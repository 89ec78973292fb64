//! `/v1/Services/{sid}/Users` and `/v1/Services/{sid}/Users/{user}` (by SID or identity):
//! create, list, fetch, update and delete users. Fetches carry `is_online`, `is_notifiable`
//! and Reach's own `date_last_seen` (lists do not, as in the hosted API); an update is
//! published to the user's watchers, a delete closes the user's sockets with 4003. With
//! `X-Twilio-Webhook-Enabled: true`, creates, updates and deletes also record their webhook
//! events, in the same transaction.

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use reach_proto::sid::looks_like_sid;
use reach_store::{AccountSid, NewUser, ServiceSid, UserRecord, UserUpdate};
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use super::extract::RestState;
use super::extract::{ApiPath, Ctx, FormParams, QueryParams, WebhookEnabled};
use super::json::{Urls, iso8601};
use super::paging::{Paging, list_response};
use crate::state::Flags;

pub(super) fn routes() -> Router<RestState> {
    Router::new()
        .route(
            "/v1/Services/{sid}/Users",
            post(create_user).get(list_users),
        )
        .route(
            "/v1/Services/{sid}/Users/{user}",
            get(fetch_user).post(update_user).delete(delete_user),
        )
}

async fn create_user(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    WebhookEnabled(fire): WebhookEnabled,
    FormParams(params): FormParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let identity = params
        .get("Identity")
        .filter(|i| !i.is_empty())
        .ok_or(ApiError::IdentityMissing)?;
    if looks_like_sid(identity) {
        return Err(ApiError::IdentityLooksLikeSid(identity.to_owned()));
    }
    let user = NewUser {
        identity: identity.to_owned(),
        friendly_name: params.get("FriendlyName").map(str::to_owned),
        attributes: params.attributes()?,
        role_sid: params.role_sid("RoleSid")?,
    };
    let app = ctx.app();
    let rec = app
        .store
        .create_user(&service, &user, fire)
        .await
        .map_err(ctx.store_err())?;
    app.events_recorded(fire);
    let cfg = ctx.config(&service.sid).await?;
    let flags = app.user_flags(&cfg, &rec).await;
    Ok((
        StatusCode::CREATED,
        Json(user_json(&ctx.urls(), rec, flags)),
    )
        .into_response())
}

async fn list_users(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    QueryParams(params): QueryParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let paging = Paging::parse(&params)?;
    let page = ctx
        .app()
        .store
        .list_users(&service.sid, paging.request())
        .await
        .map_err(ctx.store_err())?;
    let urls = ctx.urls();
    // Lists never carry reachability flags.
    let page = page.map(|u| user_json(&urls, u, Flags::NONE));
    Ok(list_response(
        &paging,
        "users",
        page,
        &urls.users(&service.sid),
        &[],
    ))
}

async fn fetch_user(ctx: Ctx, ApiPath((sid, user)): ApiPath<(String, String)>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let app = ctx.app();
    let rec = app
        .store
        .get_user(&service.sid, &user)
        .await
        .map_err(ctx.store_err())?;
    let cfg = ctx.config(&service.sid).await?;
    let flags = app.user_flags(&cfg, &rec).await;
    Ok(Json(user_json(&ctx.urls(), rec, flags)).into_response())
}

async fn update_user(
    ctx: Ctx,
    ApiPath((sid, user)): ApiPath<(String, String)>,
    WebhookEnabled(fire): WebhookEnabled,
    FormParams(params): FormParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let update = UserUpdate {
        friendly_name: params.get("FriendlyName").map(str::to_owned),
        attributes: params.attributes()?,
        role_sid: params.role_sid("RoleSid")?,
    };
    let app = ctx.app();
    let rec = app
        .store
        .update_user(&service.sid, &user, &update, fire)
        .await
        .map_err(ctx.store_err())?;
    app.events_recorded(fire);
    app.user_changed(&rec).await;
    let cfg = ctx.config(&service.sid).await?;
    let flags = app.user_flags(&cfg, &rec).await;
    Ok(Json(user_json(&ctx.urls(), rec, flags)).into_response())
}

async fn delete_user(
    ctx: Ctx,
    ApiPath((sid, user)): ApiPath<(String, String)>,
    WebhookEnabled(fire): WebhookEnabled,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let app = ctx.app();
    let rec = app
        .store
        .delete_user(&service.sid, &user, fire)
        .await
        .map_err(ctx.store_err())?;
    app.events_recorded(fire);
    app.user_deleted(&service.sid, &rec.identity).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Serialize)]
struct UserJson {
    sid: String,
    account_sid: AccountSid,
    chat_service_sid: ServiceSid,
    role_sid: Option<String>,
    identity: String,
    friendly_name: Option<String>,
    attributes: String,
    is_online: Option<bool>,
    is_notifiable: Option<bool>,
    date_created: String,
    date_updated: String,
    /// Reach's own: when the user was last seen (now while online), by the null rules of
    /// `is_online`.
    date_last_seen: Option<String>,
    url: String,
    links: UserLinks,
}

#[derive(Serialize)]
struct UserLinks {
    user_conversations: String,
}

/// A user with its reachability flags ([`Flags::NONE`] in lists).
fn user_json(urls: &Urls<'_>, u: UserRecord, flags: Flags) -> UserJson {
    let url = urls.user(&u.service_sid, &u.sid);
    UserJson {
        links: UserLinks {
            user_conversations: format!("{url}/Conversations"),
        },
        url,
        is_online: flags.is_online,
        is_notifiable: flags.is_notifiable,
        date_created: iso8601(u.date_created),
        date_updated: iso8601(u.date_updated),
        date_last_seen: flags.last_seen_at.map(iso8601),
        sid: u.sid,
        account_sid: u.account_sid,
        chat_service_sid: u.service_sid,
        role_sid: u.role_sid,
        identity: u.identity,
        friendly_name: u.friendly_name,
        attributes: u.attributes,
    }
}
