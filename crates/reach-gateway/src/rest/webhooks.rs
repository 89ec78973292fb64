//! `/v1/Services/{sid}/Configuration/Webhooks`: fetch and update a service's webhook, as the
//! hosted service-level webhook resource (`PreWebhookUrl`, `PostWebhookUrl`, `Method`,
//! repeatable `Filters`). The post-event URL receives the user events the filters name
//! (`onUserAdded`, `onUserUpdated`, `onUserRemoved`); other hosted filter names and the
//! pre-event URL are stored and listed, never called. Deliveries read the configuration as it
//! is when they are made (`crate::webhooks`).

use axum::Json;
use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use reach_store::hooks::FILTERS;
use reach_store::{AccountSid, Service, ServiceSid, WebhookConfig, WebhookMethod, WebhookUpdate};
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiPath, Ctx, FormParams, Params, RestState};
use super::json::Urls;
use crate::webhooks::check_url;

pub(super) fn routes() -> Router<RestState> {
    Router::new().route(
        "/v1/Services/{sid}/Configuration/Webhooks",
        get(fetch_webhook).post(update_webhook),
    )
}

async fn fetch_webhook(ctx: Ctx, ApiPath(sid): ApiPath<String>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let hook = ctx
        .app()
        .store
        .get_webhook(&service.sid)
        .await
        .map_err(ctx.store_err())?;
    Ok(Json(webhook_json(&ctx.urls(), &service, hook)).into_response())
}

async fn update_webhook(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    FormParams(params): FormParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let allow_link_local = ctx.app().config.webhooks.allow_link_local;
    let update = WebhookUpdate {
        pre_webhook_url: url_param(&params, "PreWebhookUrl", allow_link_local)?,
        post_webhook_url: url_param(&params, "PostWebhookUrl", allow_link_local)?,
        method: match params.get("Method") {
            None => None,
            Some(m) => Some(WebhookMethod::parse(m).ok_or_else(|| {
                ApiError::invalid(format!("Method must be GET or POST, got {m:?}"))
            })?),
        },
        filters: filters_param(&params)?,
    };
    let hook = ctx
        .app()
        .store
        .update_webhook(&service.sid, &update)
        .await
        .map_err(ctx.store_err())?;
    Ok(Json(webhook_json(&ctx.urls(), &service, hook)).into_response())
}

/// A URL parameter: absent leaves it, empty clears it, else checked ([`check_url`]) and
/// normalised.
fn url_param(
    params: &Params,
    name: &str,
    allow_link_local: bool,
) -> ApiResult<Option<Option<String>>> {
    match params.get(name) {
        None => Ok(None),
        Some("") => Ok(Some(None)),
        Some(raw) => check_url(raw, allow_link_local)
            .map(|url| Some(Some(url)))
            .map_err(|reason| ApiError::invalid(format!("{name} {reason}, got {raw:?}"))),
    }
}

/// `Filters`, repeatable: each a hosted filter name (repeats kept once); one empty value
/// clears the list.
fn filters_param(params: &Params) -> ApiResult<Option<Vec<String>>> {
    let given = params.all("Filters");
    if given.is_empty() {
        return Ok(None);
    }
    let mut filters: Vec<String> = Vec::new();
    for filter in given.into_iter().filter(|f| !f.is_empty()) {
        if !FILTERS.contains(&filter.as_str()) {
            return Err(ApiError::invalid(format!(
                "Filters must each be one of {}, got {filter:?}",
                FILTERS.join(", ")
            )));
        }
        if !filters.contains(&filter) {
            filters.push(filter);
        }
    }
    Ok(Some(filters))
}

#[derive(Serialize)]
struct WebhookJson {
    account_sid: AccountSid,
    chat_service_sid: ServiceSid,
    pre_webhook_url: Option<String>,
    post_webhook_url: Option<String>,
    filters: Vec<String>,
    method: &'static str,
    url: String,
}

fn webhook_json(urls: &Urls<'_>, service: &Service, hook: WebhookConfig) -> WebhookJson {
    WebhookJson {
        url: urls.webhooks(&service.sid),
        account_sid: service.account_sid.clone(),
        chat_service_sid: hook.service_sid,
        pre_webhook_url: hook.pre_webhook_url,
        post_webhook_url: hook.post_webhook_url,
        filters: hook.filters,
        method: hook.method.name(),
    }
}
