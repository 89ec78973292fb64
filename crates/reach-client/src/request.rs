//! Requests and their replies between the handles and the background task.
//!
//! A handle ([`Client`](crate::Client), [`User`](crate::User)) sends a [`Command`] over the
//! task's channel through its [`Link`] and waits on a oneshot for the [`Reply`], at most the
//! request timeout. The task keeps what waits in [`Requests`]: the requests queued while there
//! is no connection (in arrival order) and those sent on the current one (by id, with the
//! task's own heartbeat pings and resubscriptions). After a lost connection the requests in
//! flight go back to the front of the queue, to be sent again on the next one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use reach_proto::{ClientFrame, IdentityError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::state::Shared;
use crate::user::{User, UserCell};

/// Largest total identity length per `subscribe` frame (the server's default frame limit
/// leaves room for the frame's other bytes).
const SUBSCRIBE_CHUNK_BYTES: usize = 16 * 1024;
const SUBSCRIBE_CHUNK_IDENTITIES: usize = 500;

/// A request from the application.
#[derive(Debug, Clone)]
pub(crate) enum Request {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    UpdateToken(String),
    RegisterPush {
        binding_type: String,
        address: String,
    },
    UnregisterPush {
        binding_type: String,
        address: String,
    },
    Ping,
}

impl Request {
    fn frame(&self, id: i64) -> ClientFrame {
        match self.clone() {
            Request::Subscribe(identities) => ClientFrame::Subscribe { id, identities },
            Request::Unsubscribe(identities) => ClientFrame::Unsubscribe { id, identities },
            Request::UpdateToken(token) => ClientFrame::UpdateToken { id, token },
            Request::RegisterPush {
                binding_type,
                address,
            } => ClientFrame::RegisterPush {
                id,
                binding_type,
                address,
            },
            Request::UnregisterPush {
                binding_type,
                address,
            } => ClientFrame::UnregisterPush {
                id,
                binding_type,
                address,
            },
            Request::Ping => ClientFrame::Ping { id },
        }
    }
}

/// The task's answer to a request.
#[derive(Debug)]
pub(crate) enum Reply {
    Done,
    Subscribed {
        users: Vec<User>,
        errors: Vec<IdentityError>,
    },
    TokenUpdated {
        expires_at: i64,
    },
    PushRegistered {
        binding_sid: String,
    },
    Pong {
        rtt: Duration,
    },
}

pub(crate) type ReplyTx = oneshot::Sender<Result<Reply>>;

pub(crate) enum Command {
    Request {
        request: Request,
        reply: ReplyTx,
    },
    /// Say `bye`, close, end the task; `done` fires when it has.
    Close {
        done: oneshot::Sender<()>,
    },
}

/// What handles hold to reach the task: the command channel and the shared state.
#[derive(Debug)]
pub(crate) struct Link {
    pub shared: Arc<Shared>,
    pub cmds: mpsc::Sender<Command>,
}

impl Link {
    /// Sends a request and waits for its reply, at most the request timeout.
    pub async fn request(&self, request: Request) -> Result<Reply> {
        let timeout = self.shared.options.request_timeout;
        let (tx, rx) = oneshot::channel();
        let exchange = async {
            self.cmds
                .send(Command::Request { request, reply: tx })
                .await
                .map_err(|_| Error::ClientClosed)?;
            rx.await.map_err(|_| Error::ClientClosed)?
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout(timeout))?
    }

    pub fn user(self: &Arc<Self>, cell: Arc<UserCell>) -> User {
        User {
            cell,
            link: Some(Arc::clone(self)),
        }
    }
}

/// Splits identities into `subscribe` frames that stay well under the server's frame limit.
pub(crate) fn chunk_identities(identities: Vec<String>) -> Vec<Vec<String>> {
    let mut chunks = vec![];
    let mut current: Vec<String> = vec![];
    let mut bytes = 0;
    for identity in identities {
        if !current.is_empty()
            && (bytes + identity.len() > SUBSCRIBE_CHUNK_BYTES
                || current.len() >= SUBSCRIBE_CHUNK_IDENTITIES)
        {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += identity.len() + 3;
        current.push(identity);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A request sent on the current connection, waiting for its reply.
pub(crate) enum Pending {
    App {
        request: Request,
        reply: ReplyTx,
        sent: Instant,
    },
    /// The task's own heartbeat `ping`.
    Heartbeat,
    /// The resubscription after a reconnect.
    Resubscribe,
}

/// What waits for a reply, or for a connection to be sent on.
#[derive(Default)]
pub(crate) struct Requests {
    next_id: i64,
    /// Requests waiting for a connection, in arrival order.
    queued: VecDeque<(Request, ReplyTx)>,
    /// Requests sent on the current connection, by id.
    pending: HashMap<i64, Pending>,
}

impl Requests {
    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// The frame that sends `request` now, with a fresh id under which its reply is awaited.
    pub fn send(&mut self, request: Request, reply: ReplyTx) -> ClientFrame {
        let id = self.id();
        let frame = request.frame(id);
        self.pending.insert(
            id,
            Pending::App {
                request,
                reply,
                sent: Instant::now(),
            },
        );
        frame
    }

    /// A `subscribe` frame of the resubscription after a reconnect.
    pub fn resubscribe(&mut self, identities: Vec<String>) -> ClientFrame {
        let id = self.id();
        self.pending.insert(id, Pending::Resubscribe);
        ClientFrame::Subscribe { id, identities }
    }

    /// A heartbeat `ping`; the one sent before it (`previous`), if unanswered, is forgotten.
    pub fn heartbeat(&mut self, previous: Option<i64>) -> (i64, ClientFrame) {
        if let Some(previous) = previous {
            self.pending.remove(&previous);
        }
        let id = self.id();
        self.pending.insert(id, Pending::Heartbeat);
        (id, ClientFrame::Ping { id })
    }

    /// What was waiting for the reply with this id.
    pub fn take(&mut self, id: i64) -> Option<Pending> {
        self.pending.remove(&id)
    }

    /// The next queued request whose caller still waits.
    pub fn next_queued(&mut self) -> Option<(Request, ReplyTx)> {
        while let Some((request, reply)) = self.queued.pop_front() {
            if !reply.is_closed() {
                return Some((request, reply));
            }
        }
        None
    }

    /// Queues a request until there is a connection.
    pub fn queue(&mut self, request: Request, reply: ReplyTx) {
        self.queued.retain(|(_, r)| !r.is_closed());
        self.queued.push_back((request, reply));
    }

    pub fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }

    /// Moves the requests that were in flight back to the front of the queue, in the order
    /// they were sent, to be sent again.
    pub fn requeue_in_flight(&mut self) {
        let mut in_flight: Vec<(i64, Request, ReplyTx)> = self
            .pending
            .drain()
            .filter_map(|(id, p)| match p {
                Pending::App { request, reply, .. } if !reply.is_closed() => {
                    Some((id, request, reply))
                }
                _ => None,
            })
            .collect();
        in_flight.sort_by_key(|(id, ..)| *id);
        for (_, request, reply) in in_flight.into_iter().rev() {
            self.queued.push_front((request, reply));
        }
    }

    /// Fails every waiting request.
    pub fn fail_all(&mut self, error: impl Fn() -> Error) {
        for (_, p) in self.pending.drain() {
            if let Pending::App { reply, .. } = p {
                let _ = reply.send(Err(error()));
            }
        }
        for (_, reply) in self.queued.drain(..) {
            let _ = reply.send(Err(error()));
        }
    }

    /// The token was refused: fails every request but the token updates that were in flight
    /// (only a new token can lead anywhere now), which are returned to be sent again.
    pub fn deny(&mut self, error: impl Fn() -> Error) -> Vec<(Request, ReplyTx)> {
        let mut tokens = Vec::new();
        for (_, p) in self.pending.drain() {
            if let Pending::App { request, reply, .. } = p {
                match request {
                    Request::UpdateToken(_) => tokens.push((request, reply)),
                    _ => {
                        let _ = reply.send(Err(error()));
                    }
                }
            }
        }
        for (_, reply) in self.queued.drain(..) {
            let _ = reply.send(Err(error()));
        }
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_subscriptions_are_split_into_frames_under_the_limit() {
        let ids: Vec<String> = (0..1200).map(|i| format!("user-{i:05}")).collect();
        let chunks = chunk_identities(ids.clone());
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.len() <= SUBSCRIBE_CHUNK_IDENTITIES));
        assert_eq!(chunks.concat(), ids);
        let long: Vec<String> = (0..200).map(|i| format!("{i:0>250}")).collect();
        for c in chunk_identities(long) {
            let frame = reach_proto::encode(
                &ClientFrame::Subscribe {
                    id: 1,
                    identities: c,
                },
                reach_proto::Encoding::Json,
            );
            assert!(frame.len() < 64 * 1024);
        }
        assert!(chunk_identities(vec![]).is_empty());
    }

    #[test]
    fn requests_in_flight_are_sent_again_first_and_in_order() {
        let mut r = Requests::default();
        let (tx1, _rx1) = oneshot::channel();
        let (tx2, _rx2) = oneshot::channel();
        let (tx3, _rx3) = oneshot::channel();
        let (gone, rx_gone) = oneshot::channel();
        drop(rx_gone);
        r.send(Request::Ping, tx1);
        r.send(Request::Subscribe(vec!["a".into()]), tx2);
        r.send(Request::Ping, gone);
        r.queue(Request::Unsubscribe(vec!["b".into()]), tx3);
        r.requeue_in_flight();
        let order: Vec<String> = std::iter::from_fn(|| r.next_queued())
            .map(|(req, _)| format!("{req:?}"))
            .collect();
        assert_eq!(
            order,
            [r#"Ping"#, r#"Subscribe(["a"])"#, r#"Unsubscribe(["b"])"#],
            "a caller that gave up is not sent again"
        );
    }

    #[test]
    fn a_refused_token_fails_all_but_token_updates_in_flight() {
        let mut r = Requests::default();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, _rx2) = oneshot::channel();
        let (tx3, mut rx3) = oneshot::channel();
        r.send(Request::Ping, tx1);
        r.send(Request::UpdateToken("t".into()), tx2);
        r.queue(Request::UpdateToken("queued".into()), tx3);
        let kept = r.deny(|| Error::ClientClosed);
        assert!(matches!(&kept[..], [(Request::UpdateToken(t), _)] if t == "t"));
        assert!(matches!(rx1.try_recv(), Ok(Err(Error::ClientClosed))));
        assert!(matches!(rx3.try_recv(), Ok(Err(Error::ClientClosed))));
        assert!(!r.has_queued());
    }
}
