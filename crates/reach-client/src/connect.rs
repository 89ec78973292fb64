//! Opening one connection: check the URL, upgrade offering the chosen subprotocol, say
//! `hello`, wait for `welcome`. A refusal comes back as a typed [`Error`]: `Denied` for a
//! token refused with close 4001, `Rejected` for an HTTP error at the upgrade, `Connect` when
//! the TCP connection fails, `Timeout` past the connect timeout.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reach_proto::{
    ClientFrame, CloseCode, Encoding, ErrorCode, ServerFrame, decode_server, encode,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri, header};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::{Error, Result};
use crate::options::Options;
use crate::tls::TlsConfig;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Checks a gateway URL and completes it: `ws://host:port` gets the path `/v1/ws`.
pub(crate) fn normalize_url(url: &str) -> Result<String> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url
        .trim()
        .parse()
        .map_err(|e| invalid(&format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        Some(other) => {
            return Err(invalid(&format!(
                "the scheme must be ws:// or wss://, not {other}://"
            )));
        }
        None => return Err(invalid("the URL must start with ws:// or wss://")),
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid("the URL names no host"));
    };
    if authority.host().is_empty() {
        return Err(invalid("the URL names no host"));
    }
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => "/v1/ws",
        Some(p) => p,
    };
    let scheme = uri.scheme_str().unwrap_or("ws");
    Ok(format!("{scheme}://{authority}{path}"))
}

/// What a `welcome` told the client.
#[derive(Debug, Clone)]
pub(crate) struct Welcome {
    pub connection_id: String,
    pub service_sid: String,
    pub reachability_enabled: bool,
    pub heartbeat_interval: Duration,
    pub token_expires_at: i64,
    pub user: reach_proto::User,
}

/// An open, authenticated connection.
pub(crate) struct Connection {
    pub ws: Ws,
    pub encoding: Encoding,
    pub welcome: Welcome,
}

fn connect_error(e: tungstenite::Error, url: &str) -> Error {
    match e {
        tungstenite::Error::Io(e)
            if e.get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
        {
            Error::Tls(e.to_string())
        }
        tungstenite::Error::Io(e) => Error::Connect(e),
        tungstenite::Error::Tls(e) => Error::Tls(e.to_string()),
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
            Error::Rejected { status, message }
        }
        tungstenite::Error::Url(e) => Error::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        },
        other => Error::Protocol(format!("WebSocket handshake failed: {other}")),
    }
}

pub(crate) fn to_message(frame: &ClientFrame, encoding: Encoding) -> Message {
    let bytes = encode(frame, encoding);
    match encoding {
        Encoding::MsgPack => Message::Binary(bytes),
        Encoding::Json => match Utf8Bytes::try_from(bytes) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Text(Utf8Bytes::from_static("{}")),
        },
    }
}

/// Decodes a data message; `None` for control messages. The message kind decides the
/// encoding, so a server that answers in the other encoding is still understood.
pub(crate) fn decode(
    msg: &Message,
) -> Option<std::result::Result<ServerFrame, reach_proto::DecodeError>> {
    match msg {
        Message::Text(t) => Some(decode_server(t.as_bytes(), Encoding::Json)),
        Message::Binary(b) => Some(decode_server(b, Encoding::MsgPack)),
        _ => None,
    }
}

pub(crate) fn close_parts(
    frame: Option<&tungstenite::protocol::CloseFrame>,
) -> (Option<u16>, String) {
    match frame {
        Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
        None => (None, String::new()),
    }
}

/// Connects, says `hello`, waits for `welcome`; all within `options.connect_timeout`.
pub(crate) async fn open(url: &str, token: &str, options: &Options) -> Result<Connection> {
    let limit = options.connect_timeout;
    tokio::time::timeout(limit, open_inner(url, token, options))
        .await
        .map_err(|_| Error::Timeout(limit))?
}

async fn open_inner(url: &str, token: &str, options: &Options) -> Result<Connection> {
    let mut request = url.into_client_request().map_err(|e| Error::InvalidUrl {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(options.encoding.subprotocol()),
    );
    let connector = if url.starts_with("wss://") {
        let tls = options.tls.clone().unwrap_or_else(TlsConfig::system);
        Some(tokio_tungstenite::Connector::Rustls(tls.client_config()))
    } else {
        Some(tokio_tungstenite::Connector::Plain)
    };
    let (mut ws, response) =
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector)
            .await
            .map_err(|e| connect_error(e, url))?;
    let encoding = match response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap_or_default())
    {
        None => Encoding::Json,
        Some(p) if p == Encoding::MsgPack.subprotocol() => Encoding::MsgPack,
        Some(p) if p == Encoding::Json.subprotocol() => Encoding::Json,
        Some(other) => {
            return Err(Error::Protocol(format!(
                "the server chose an unknown subprotocol {other:?}"
            )));
        }
    };
    let hello = ClientFrame::Hello {
        token: token.to_owned(),
        client: Some(options.client_name.clone()),
    };
    ws.send(to_message(&hello, encoding))
        .await
        .map_err(|e| Error::Closed {
            code: None,
            reason: format!("cannot send hello: {e}"),
        })?;
    let mut error: Option<(u32, String)> = None;
    loop {
        let msg = match ws.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                return Err(Error::Closed {
                    code: None,
                    reason: format!("the connection failed before welcome: {e}"),
                });
            }
            None => {
                return Err(Error::Closed {
                    code: None,
                    reason: "the server closed the connection before welcome".into(),
                });
            }
        };
        if let Message::Close(frame) = &msg {
            let (code, reason) = close_parts(frame.as_ref());
            let refused = code.and_then(CloseCode::from_u16) == Some(CloseCode::Unauthorized);
            return Err(match (refused, error) {
                (true, Some((code, message))) => Error::Denied { code, message },
                (true, None) => Error::Denied {
                    code: ErrorCode::InvalidAccessToken.as_u32(),
                    message: reason,
                },
                (false, Some((code, message))) => Error::Server { code, message },
                (false, None) => Error::Closed { code, reason },
            });
        }
        match decode(&msg) {
            None => {}
            Some(Err(e)) => return Err(Error::Protocol(format!("undecodable frame: {e}"))),
            Some(Ok(ServerFrame::Welcome {
                connection_id,
                service_sid,
                reachability_enabled,
                heartbeat_interval_ms,
                token_expires_at,
                user,
                ..
            })) => {
                return Ok(Connection {
                    ws,
                    encoding,
                    welcome: Welcome {
                        connection_id,
                        service_sid,
                        reachability_enabled,
                        heartbeat_interval: Duration::from_millis(heartbeat_interval_ms.max(1)),
                        token_expires_at,
                        user,
                    },
                });
            }
            Some(Ok(ServerFrame::Error { code, message, .. })) => error = Some((code, message)),
            Some(Ok(other)) => tracing::debug!(?other, "frame before welcome ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_completed() {
        assert_eq!(
            normalize_url("ws://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1/ws"
        );
        assert_eq!(
            normalize_url("ws://example.com/custom/ws?x=1").unwrap(),
            "ws://example.com/custom/ws?x=1"
        );
        assert_eq!(
            normalize_url("wss://reach.example.com").unwrap(),
            "wss://reach.example.com/v1/ws"
        );
        for bad in ["", "not a url", "http://host/v1/ws", "/v1/ws"] {
            assert!(
                matches!(normalize_url(bad), Err(Error::InvalidUrl { .. })),
                "{bad:?}"
            );
        }
    }
}
