//! Profile reads for `subscribe`, coalesced across sockets.
//!
//! A `subscribe` to users not in memory (a cluster's remote users, a user offline and watched
//! by nobody) reads their profiles before it answers. In a subscribe storm (a fleet of clients
//! reconnecting, each watching its room) every socket asks at once and mostly for the same
//! users: read one by one, 19,000 sockets in rooms of 10 on two nodes made ~9,500 reads per
//! node, queued behind the store's pool until some timed out (`20500 ... retry later`).
//! [`ProfileReads`] serves the asks that wait together with one store call per service, each
//! identity read once, and runs at most [`PARALLEL`] such calls at a time: while they run, new
//! asks gather for the next call. An ask that finds a call slot free is read at once. A call
//! that takes longer than [`READ_TIMEOUT`] fails the asks it serves (their subscribes answer
//! `20500 ... retry later`), so a stuck store cannot hold every subscribe of the node.
//! A single node (SQLite) reads the same way.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use reach_proto::ServiceSid;
use reach_store::{Store, StoreError, UserRecord};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Store calls in flight at once (a node's PostgreSQL pool has 8 connections, SQLite's 4: the
/// rest stay free for `hello`, REST and the recorder).
pub const PARALLEL: usize = 2;

/// Once the asks gathered for one call name this many identities, no more are added (the store
/// reads them 64 per query); a call can hold up to one ask's worth more.
pub const MAX_BATCH: usize = 4096;

/// How long one store call may take before the asks it serves fail.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One store call: the records of these distinct identities of a service.
pub type ReadFn = Arc<
    dyn Fn(ServiceSid, Vec<String>) -> BoxFuture<'static, reach_store::Result<Vec<UserRecord>>>
        + Send
        + Sync,
>;

/// What a socket asks for.
struct Ask {
    service: ServiceSid,
    identities: Vec<String>,
    reply: oneshot::Sender<Result<Vec<UserRecord>, String>>,
}

/// Handle of the reader task. Cheap to clone.
#[derive(Clone)]
pub struct ProfileReads {
    asks: mpsc::UnboundedSender<Ask>,
}

impl std::fmt::Debug for ProfileReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileReads").finish_non_exhaustive()
    }
}

impl ProfileReads {
    /// Starts the reader over a store (`get_users_by_identity`).
    pub fn over(store: Arc<dyn Store>) -> ProfileReads {
        ProfileReads::start(Arc::new(
            move |service: ServiceSid, identities: Vec<String>| {
                let store = Arc::clone(&store);
                Box::pin(async move { store.get_users_by_identity(&service, &identities).await })
            },
        ))
    }

    /// Starts the reader task over any read (tests give their own).
    pub fn start(read: ReadFn) -> ProfileReads {
        let (asks, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(read, rx));
        ProfileReads { asks }
    }

    /// The records of these users of `service` (distinct identities; those that do not exist
    /// are left out), read together with what other sockets ask for meanwhile.
    pub async fn read(
        &self,
        service: &ServiceSid,
        identities: Vec<String>,
    ) -> reach_store::Result<Vec<UserRecord>> {
        let (reply, answer) = oneshot::channel();
        let ask = Ask {
            service: service.clone(),
            identities,
            reply,
        };
        let stopped = || StoreError::Backend("the read of users was dropped".into());
        if self.asks.send(ask).is_err() {
            return Err(stopped());
        }
        match answer.await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(e)) => Err(StoreError::Backend(e)),
            Err(_) => Err(stopped()),
        }
    }
}

/// Takes the asks that wait whenever a call may start, and starts it.
async fn run(read: ReadFn, mut rx: mpsc::UnboundedReceiver<Ask>) {
    let slots = Arc::new(Semaphore::new(PARALLEL));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut count = first.identities.len();
        let mut asks = vec![first];
        while count < MAX_BATCH {
            match rx.try_recv() {
                Ok(ask) => {
                    count += ask.identities.len();
                    asks.push(ask);
                }
                Err(_) => break,
            }
        }
        let read = Arc::clone(&read);
        tokio::spawn(async move {
            serve(&read, asks).await;
            drop(slot);
        });
    }
}

/// One call per service for these asks; each gets the records it named.
async fn serve(read: &ReadFn, asks: Vec<Ask>) {
    let mut by_service: HashMap<ServiceSid, Vec<Ask>> = HashMap::new();
    for ask in asks {
        if ask.reply.is_closed() {
            // The socket is gone.
            continue;
        }
        by_service.entry(ask.service.clone()).or_default().push(ask);
    }
    for (service, asks) in by_service {
        let wanted: HashSet<&str> = asks
            .iter()
            .flat_map(|a| a.identities.iter().map(String::as_str))
            .collect();
        let wanted: Vec<String> = wanted.into_iter().map(str::to_owned).collect();
        let result = match tokio::time::timeout(READ_TIMEOUT, read(service, wanted)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Backend(format!(
                "the read of users did not finish within {} s",
                READ_TIMEOUT.as_secs()
            ))),
        };
        match result {
            Ok(found) => {
                let by_identity: HashMap<&str, &UserRecord> =
                    found.iter().map(|r| (r.identity.as_str(), r)).collect();
                for ask in asks {
                    let mine = ask
                        .identities
                        .iter()
                        .filter_map(|i| by_identity.get(i.as_str()).map(|r| (*r).clone()))
                        .collect();
                    let _ = ask.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                // `read` wraps it in `StoreError::Backend` again.
                let e = match e {
                    StoreError::Backend(message) => message,
                    other => other.to_string(),
                };
                for ask in asks {
                    let _ = ask.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn svc(n: u8) -> ServiceSid {
        format!("IS{:032x}", n).parse().unwrap()
    }

    fn record(service: &ServiceSid, identity: &str) -> UserRecord {
        UserRecord {
            sid: reach_proto::SidKind::User.generate(),
            account_sid: "AC11111111111111111111111111111111".parse().unwrap(),
            service_sid: service.clone(),
            identity: identity.to_owned(),
            friendly_name: None,
            attributes: "{}".into(),
            role_sid: None,
            date_created: 0,
            date_updated: 0,
            revision: 1,
            online_epoch: 0,
            ever_had_binding: false,
            binding_count: 0,
            presence_online: false,
            last_seen_at: None,
        }
    }

    /// A store holding users `u0`..`u99` of every service, that blocks each call until the
    /// test lets it go, and logs what each call asked for.
    struct Fake {
        calls: Mutex<Vec<(ServiceSid, Vec<String>)>>,
        gate: Semaphore,
        fail: bool,
    }

    fn reader(fake: &Arc<Fake>) -> ProfileReads {
        let fake = Arc::clone(fake);
        ProfileReads::start(Arc::new(move |service: ServiceSid, ids: Vec<String>| {
            let fake = Arc::clone(&fake);
            Box::pin(async move {
                let mut sorted = ids.clone();
                sorted.sort();
                fake.calls.lock().unwrap().push((service.clone(), sorted));
                fake.gate.acquire().await.unwrap().forget();
                if fake.fail {
                    return Err(StoreError::Backend("connection refused".into()));
                }
                Ok(ids
                    .iter()
                    .filter(|i| {
                        i.strip_prefix('u')
                            .and_then(|n| n.parse::<u32>().ok())
                            .is_some_and(|n| n < 100)
                    })
                    .map(|i| record(&service, i))
                    .collect())
            })
        }))
    }

    fn fake(fail: bool) -> Arc<Fake> {
        Arc::new(Fake {
            calls: Mutex::new(Vec::new()),
            gate: Semaphore::new(0),
            fail,
        })
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn identities(found: &[UserRecord]) -> Vec<&str> {
        let mut v: Vec<&str> = found.iter().map(|r| r.identity.as_str()).collect();
        v.sort();
        v
    }

    async fn calls_reach(fake: &Fake, n: usize) {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while fake.calls.lock().unwrap().len() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the reader made the calls");
    }

    #[tokio::test]
    async fn asks_that_wait_together_are_one_call_per_service_each_identity_once() {
        let fake = fake(false);
        let reads = reader(&fake);
        // Both call slots taken by two lone asks, held at the gate.
        let first = tokio::spawn({
            let reads = reads.clone();
            async move { reads.read(&svc(1), ids(&["u1"])).await }
        });
        calls_reach(&fake, 1).await;
        let second = tokio::spawn({
            let reads = reads.clone();
            async move { reads.read(&svc(1), ids(&["u2"])).await }
        });
        calls_reach(&fake, 2).await;
        // These wait meanwhile: overlapping users of service 1, one of service 2, and a user
        // that does not exist.
        let waiting: Vec<_> = [
            (svc(1), ids(&["u3", "u4", "u5"])),
            (svc(1), ids(&["u4", "u5", "u6", "nobody"])),
            (svc(2), ids(&["u3"])),
        ]
        .into_iter()
        .map(|(s, i)| {
            let reads = reads.clone();
            tokio::spawn(async move { reads.read(&s, i).await })
        })
        .collect();
        tokio::task::yield_now().await;
        fake.gate.add_permits(100);
        assert_eq!(identities(&first.await.unwrap().unwrap()), ["u1"]);
        assert_eq!(identities(&second.await.unwrap().unwrap()), ["u2"]);
        let mut answers = Vec::new();
        for w in waiting {
            answers.push(w.await.unwrap().unwrap());
        }
        assert_eq!(identities(&answers[0]), ["u3", "u4", "u5"]);
        assert_eq!(identities(&answers[1]), ["u4", "u5", "u6"]);
        assert_eq!(identities(&answers[2]), ["u3"]);
        assert_eq!(answers[2][0].service_sid, svc(2));
        let mut calls = fake.calls.lock().unwrap().clone();
        calls.sort_by_key(|(s, i)| (s.to_string(), i.clone()));
        assert_eq!(
            calls,
            [
                (svc(1), ids(&["nobody", "u3", "u4", "u5", "u6"])),
                (svc(1), ids(&["u1"])),
                (svc(1), ids(&["u2"])),
                (svc(2), ids(&["u3"])),
            ],
            "the three waiting asks: one call per service, each identity once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_call_fails_its_asks_after_the_timeout_and_frees_its_slot() {
        // The gate never opens: every call hangs.
        let fake = fake(false);
        let reads = reader(&fake);
        let asks: Vec<_> = (0..PARALLEL + 1)
            .map(|n| {
                let reads = reads.clone();
                tokio::spawn(async move { reads.read(&svc(1), vec![format!("u{n}")]).await })
            })
            .collect();
        for a in asks {
            let e = a.await.unwrap().unwrap_err();
            assert!(e.to_string().contains("did not finish"), "{e}");
        }
        // The slots came back: a later ask gets a call of its own.
        let before = fake.calls.lock().unwrap().len();
        let e = reads.read(&svc(1), ids(&["u9"])).await.unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert_eq!(fake.calls.lock().unwrap().len(), before + 1);
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_ask_it_served_and_the_reader_goes_on() {
        let fake = fake(true);
        let reads = reader(&fake);
        let asks: Vec<_> = (0..3)
            .map(|n| {
                let reads = reads.clone();
                tokio::spawn(async move { reads.read(&svc(1), vec![format!("u{n}")]).await })
            })
            .collect();
        fake.gate.add_permits(100);
        for a in asks {
            let e = a.await.unwrap().unwrap_err();
            assert_eq!(e.to_string(), "storage failure: connection refused");
        }
        let again = reads.read(&svc(1), ids(&["u7"])).await.unwrap_err();
        assert_eq!(again.to_string(), "storage failure: connection refused");
    }
}
