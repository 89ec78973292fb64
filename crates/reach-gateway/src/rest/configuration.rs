//! `/v1/Services/{sid}/Configuration`: fetch and update, with `ReachabilityEnabled`. Writes
//! hold the switch lock across the store write and the engine call, so the engine applies a
//! service's flips in commit order.

use axum::Json;
use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use reach_store::{ConfigUpdate, ServiceConfig, ServiceSid};
use serde::Serialize;

use super::error::ApiResult;
use super::extract::RestState;
use super::extract::{ApiPath, Ctx, FormParams};
use super::json::Urls;

pub(super) fn routes() -> Router<RestState> {
    Router::new().route(
        "/v1/Services/{sid}/Configuration",
        get(fetch_config).post(update_config),
    )
}

async fn fetch_config(ctx: Ctx, ApiPath(sid): ApiPath<String>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let cfg = ctx.config(&service.sid).await?;
    Ok(Json(config_json(&ctx.urls(), cfg)).into_response())
}

async fn update_config(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    FormParams(params): FormParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let update = ConfigUpdate {
        reachability_enabled: params.boolean("ReachabilityEnabled")?,
        default_conversation_creator_role_sid: params
            .role_sid("DefaultConversationCreatorRoleSid")?,
        default_conversation_role_sid: params.role_sid("DefaultConversationRoleSid")?,
        default_chat_service_role_sid: params.role_sid("DefaultChatServiceRoleSid")?,
    };
    let app = ctx.app();
    let cfg = {
        let _order = ctx.state.switch_writes.lock().await;
        let cfg = app
            .store
            .update_config(&service.sid, &update)
            .await
            .map_err(ctx.store_err())?;
        app.service_changed(&cfg).await;
        cfg
    };
    Ok(Json(config_json(&ctx.urls(), cfg)).into_response())
}

#[derive(Serialize)]
struct ConfigJson {
    chat_service_sid: ServiceSid,
    default_conversation_creator_role_sid: Option<String>,
    default_conversation_role_sid: Option<String>,
    default_chat_service_role_sid: Option<String>,
    reachability_enabled: bool,
    url: String,
    links: ConfigLinks,
}

#[derive(Serialize)]
struct ConfigLinks {
    notifications: String,
    webhooks: String,
}

fn config_json(urls: &Urls<'_>, c: ServiceConfig) -> ConfigJson {
    let url = urls.config(&c.service_sid);
    ConfigJson {
        links: ConfigLinks {
            notifications: format!("{url}/Notifications"),
            webhooks: format!("{url}/Webhooks"),
        },
        url,
        chat_service_sid: c.service_sid,
        default_conversation_creator_role_sid: c.default_conversation_creator_role_sid,
        default_conversation_role_sid: c.default_conversation_role_sid,
        default_chat_service_role_sid: c.default_chat_service_role_sid,
        reachability_enabled: c.reachability_enabled,
    }
}
