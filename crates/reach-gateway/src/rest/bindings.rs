//! `/v1/Services/{sid}/Bindings` and `/v1/Services/{sid}/Bindings/{binding}`: list (filtered
//! by `BindingType` and `Identity`), fetch and delete push bindings. Clients register them over
//! their socket (`register_push`); a delete is published as the user's new `is_notifiable`
//! (and, with `X-Twilio-Webhook-Enabled: true`, sent to the service's webhook).

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use reach_proto::BindingType;
use reach_store::{AccountSid, Binding, BindingFilter, ServiceSid, StoreError};
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use super::extract::RestState;
use super::extract::{ApiPath, Ctx, QueryParams, WebhookEnabled};
use super::json::{Urls, iso8601};
use super::paging::{Paging, list_response};

/// Most values accepted for one repeatable filter (`BindingType`, `Identity`); each becomes a
/// bound SQL parameter.
const MAX_FILTER_VALUES: usize = 100;

pub(super) fn routes() -> Router<RestState> {
    Router::new()
        .route("/v1/Services/{sid}/Bindings", get(list_bindings))
        .route(
            "/v1/Services/{sid}/Bindings/{binding}",
            get(fetch_binding).delete(delete_binding),
        )
}

async fn list_bindings(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    QueryParams(params): QueryParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let paging = Paging::parse(&params)?;
    let filter = BindingFilter {
        binding_types: params.all("BindingType"),
        identities: params.all("Identity"),
    };
    if let Some(bad) = filter
        .binding_types
        .iter()
        .find(|t| t.parse::<BindingType>().is_err())
    {
        return Err(ApiError::invalid(format!(
            "BindingType must be one of {}, got {bad:?}",
            BindingType::NAMES
        )));
    }
    if filter.binding_types.len() > MAX_FILTER_VALUES || filter.identities.len() > MAX_FILTER_VALUES
    {
        return Err(ApiError::invalid(format!(
            "BindingType and Identity may each be given at most {MAX_FILTER_VALUES} times"
        )));
    }
    let page = ctx
        .app()
        .store
        .list_bindings(&service.sid, &filter, paging.request())
        .await
        .map_err(ctx.store_err())?;
    let urls = ctx.urls();
    let page = page.map(|b| binding_json(&urls, b));
    let filters: Vec<(&str, String)> = filter
        .binding_types
        .into_iter()
        .map(|t| ("BindingType", t))
        .chain(filter.identities.into_iter().map(|i| ("Identity", i)))
        .collect();
    Ok(list_response(
        &paging,
        "bindings",
        page,
        &urls.bindings(&service.sid),
        &filters,
    ))
}

async fn fetch_binding(ctx: Ctx, ApiPath((sid, binding)): ApiPath<(String, String)>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let b = ctx
        .app()
        .store
        .get_binding(&service.sid, &binding)
        .await
        .map_err(ctx.store_err())?;
    Ok(Json(binding_json(&ctx.urls(), b)).into_response())
}

async fn delete_binding(
    ctx: Ctx,
    ApiPath((sid, binding)): ApiPath<(String, String)>,
    WebhookEnabled(fire): WebhookEnabled,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let app = ctx.app();
    let b = app
        .store
        .delete_binding(&service.sid, &binding, fire)
        .await
        .map_err(ctx.store_err())?;
    app.events_recorded(fire);
    // The delete bumped the user's revision; publish the new notifiable state.
    match app.store.get_user(&service.sid, &b.identity).await {
        Ok(rec) => app.user_changed(&rec).await,
        // Deleted meanwhile: its sockets were closed by that delete.
        Err(StoreError::NotFound) => {}
        Err(e) => tracing::warn!(
            service_sid = %service.sid, identity = %b.identity, error = %e,
            "binding deleted, but the user could not be re-read to publish it"
        ),
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `message_types` of every binding. Reach records registrations only and does not send pushes,
/// so a binding is reported with the hosted API's default notification types.
const MESSAGE_TYPES: [&str; 3] = [
    "new_message",
    "added_to_conversation",
    "removed_from_conversation",
];

#[derive(Serialize)]
struct BindingJson {
    sid: String,
    account_sid: AccountSid,
    chat_service_sid: ServiceSid,
    credential_sid: Option<String>,
    date_created: String,
    date_updated: String,
    endpoint: String,
    identity: String,
    binding_type: String,
    message_types: [&'static str; 3],
    url: String,
}

fn binding_json(urls: &Urls<'_>, b: Binding) -> BindingJson {
    BindingJson {
        url: urls.binding(&b.service_sid, &b.sid),
        date_created: iso8601(b.date_created),
        date_updated: iso8601(b.date_updated),
        sid: b.sid,
        account_sid: b.account_sid,
        chat_service_sid: b.service_sid,
        credential_sid: b.credential_sid,
        endpoint: b.address,
        identity: b.identity,
        binding_type: b.binding_type,
        message_types: MESSAGE_TYPES,
    }
}
