//! `/v1/Services` and `/v1/Services/{sid}`: create, list, fetch and delete services. A new
//! service's configuration (reachability off) reaches the engine at once; a delete closes
//! the service's sockets with 4003 and refuses its tokens.

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use reach_store::{AccountSid, Service, ServiceSid};
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use super::extract::RestState;
use super::extract::{ApiPath, Ctx, FormParams, QueryParams};
use super::json::{Urls, iso8601};
use super::paging::{Paging, list_response};

pub(super) fn routes() -> Router<RestState> {
    Router::new()
        .route("/v1/Services", post(create_service).get(list_services))
        .route(
            "/v1/Services/{sid}",
            get(fetch_service).delete(delete_service),
        )
}

async fn create_service(ctx: Ctx, FormParams(params): FormParams) -> ApiResult {
    let name = params
        .get("FriendlyName")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid("Missing required parameter FriendlyName in the post body")
        })?;
    let app = ctx.app();
    let service = app
        .store
        .create_service(&ctx.account, name)
        .await
        .map_err(ctx.store_err())?;
    let cfg = ctx.config(&service.sid).await?;
    app.service_changed(&cfg).await;
    Ok((
        StatusCode::CREATED,
        Json(service_json(&ctx.urls(), service)),
    )
        .into_response())
}

async fn list_services(ctx: Ctx, QueryParams(params): QueryParams) -> ApiResult {
    let paging = Paging::parse(&params)?;
    let page = ctx
        .app()
        .store
        .list_services(&ctx.account, paging.request())
        .await
        .map_err(ctx.store_err())?;
    let urls = ctx.urls();
    let page = page.map(|s| service_json(&urls, s));
    Ok(list_response(
        &paging,
        "services",
        page,
        &urls.services(),
        &[],
    ))
}

async fn fetch_service(ctx: Ctx, ApiPath(sid): ApiPath<String>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    Ok(Json(service_json(&ctx.urls(), service)).into_response())
}

async fn delete_service(ctx: Ctx, ApiPath(sid): ApiPath<String>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let _order = ctx.state.switch_writes.lock().await;
    ctx.app()
        .store
        .delete_service(&ctx.account, &service.sid)
        .await
        .map_err(ctx.store_err())?;
    ctx.app().service_deleted(&service.sid).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Serialize)]
struct ServiceJson {
    sid: ServiceSid,
    account_sid: AccountSid,
    friendly_name: String,
    date_created: String,
    date_updated: String,
    url: String,
    links: ServiceLinks,
}

#[derive(Serialize)]
struct ServiceLinks {
    conversations: String,
    users: String,
    roles: String,
    bindings: String,
    configuration: String,
    participant_conversations: String,
}

fn service_json(urls: &Urls<'_>, s: Service) -> ServiceJson {
    let url = urls.service(&s.sid);
    ServiceJson {
        links: ServiceLinks {
            conversations: format!("{url}/Conversations"),
            users: urls.users(&s.sid),
            roles: format!("{url}/Roles"),
            bindings: urls.bindings(&s.sid),
            configuration: urls.config(&s.sid),
            participant_conversations: format!("{url}/ParticipantConversations"),
        },
        url,
        date_created: iso8601(s.date_created),
        date_updated: iso8601(s.date_updated),
        sid: s.sid,
        account_sid: s.account_sid,
        friendly_name: s.friendly_name,
    }
}
