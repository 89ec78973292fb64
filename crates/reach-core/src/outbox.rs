//! The per-connection outbox: what the engine and the connection's request handling have
//! queued for one socket, drained by that socket's writer.
//!
//! Three kinds of item sit in one FIFO queue:
//! - [`Item::Frame`]: bytes already encoded (replies, `service_updated`, errors);
//! - [`Item::Update`]: a `user_updated` whose bytes are shared with every subscriber of the
//!   same diff. While an update for a user is still queued, a newer one for the same user
//!   *replaces* it in place (latest state kept, reasons merged) unless a frame or a slot was
//!   queued after it: a subscriber that falls behind holds at most one pending update per user
//!   it watches between two other items, and never misses the final state;
//! - [`Item::Slot`]: a reply whose users are filled in under the presence map's lock
//!   (`welcome`, `subscribed`), so no update for those users can overtake the state the reply
//!   carries. The writer stops at a slot until it is sealed.
//!
//! Memory is bounded: when the queued bytes pass `max_bytes` the outbox asks the connection to
//! close with 4009 (slow consumer) and drops what it holds. One queued item is kept inline (a
//! delivery to an idle queue allocates nothing and touches no buffer); a second moves them
//! into a ring buffer, given back once the queue drains, so an idle connection's outbox costs
//! only its struct.
//!
//! Writes without the connection's task: a session that waits with nothing unwritten on a
//! plain TCP connection lends the outbox its socket ([`Outbox::grant`], a [`Sink`] set once
//! with [`Outbox::set_sink`]). An update queued then does not wake the session
//! ([`PushOutcome::Held`]): the fan-out sends it itself, after leaving the presence map's lock
//! ([`Outbox::flush`]), so a delivery costs one `send` instead of a task's wake-up. The
//! session takes the socket back ([`Outbox::revoke`]) before any write or read of its own,
//! with the rest of a frame the socket took only in part, to send first (the fan-out then
//! wakes it).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Waker;

use bytes::Bytes;
use reach_proto::{
    CloseCode, Encoding, IdentityError, Reasons, ServerFrame, User, encode, encode_sized,
};

/// One diff of one user, shared (behind an `Arc`) by every subscriber it is fanned out to.
#[derive(Debug)]
pub struct Update {
    pub user: User,
    pub reasons: Reasons,
    encoded: [OnceLock<Bytes>; 2],
}

impl Update {
    pub fn new(user: User, reasons: Reasons) -> Arc<Update> {
        Arc::new(Update {
            user,
            reasons,
            encoded: [OnceLock::new(), OnceLock::new()],
        })
    }

    /// The `user_updated` frame in this encoding, encoded on first use and then shared.
    pub fn bytes(&self, encoding: Encoding) -> Bytes {
        self.encoded(encoding).clone()
    }

    fn encoded(&self, encoding: Encoding) -> &Bytes {
        self.encoded[encoding.index()].get_or_init(|| encode(&self.frame(self.reasons), encoding))
    }

    fn frame(&self, reasons: Reasons) -> ServerFrame {
        ServerFrame::UserUpdated {
            user: self.user.clone(),
            reasons: reasons.to_vec(),
        }
    }

    fn approx_size(&self) -> usize {
        96 + self.user.identity.len()
            + self.user.attributes.len()
            + self.user.friendly_name.as_ref().map_or(0, String::len)
    }
}

/// A reply whose users are filled in under the presence map's lock.
#[derive(Debug)]
pub enum SlotFrame {
    /// `welcome`; `user` is filled with the connection's own user.
    Welcome {
        connection_id: String,
        identity: String,
        service_sid: String,
        reachability_enabled: bool,
        heartbeat_interval_ms: u64,
        token_expires_at: i64,
        user: Option<User>,
    },
    /// `subscribed`; users are filled one by one, errors added before sealing.
    Subscribed {
        id: i64,
        users: Vec<User>,
        errors: Vec<IdentityError>,
    },
}

impl SlotFrame {
    fn into_frame(self) -> ServerFrame {
        match self {
            SlotFrame::Welcome {
                connection_id,
                identity,
                service_sid,
                reachability_enabled,
                heartbeat_interval_ms,
                token_expires_at,
                user,
            } => {
                let user = user.unwrap_or_else(|| User {
                    identity: identity.clone(),
                    friendly_name: None,
                    attributes: "{}".into(),
                    is_online: None,
                    is_notifiable: None,
                    last_seen_at: None,
                });
                ServerFrame::Welcome {
                    connection_id,
                    identity,
                    service_sid,
                    reachability_enabled,
                    heartbeat_interval_ms,
                    token_expires_at,
                    user,
                }
            }
            SlotFrame::Subscribed { id, users, errors } => {
                ServerFrame::Subscribed { id, users, errors }
            }
        }
    }
}

/// Handle of a reserved slot (its absolute position in the queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotId(u64);

#[derive(Debug)]
enum Item {
    Frame(Bytes),
    Update {
        update: Arc<Update>,
        reasons: Reasons,
    },
    Slot {
        /// Boxed: it is large and rare, and every queued item is as large as the largest kind.
        frame: Box<SlotFrame>,
        sealed: bool,
        /// Fills still expected from elsewhere (cluster mode: a watched user's state from the
        /// backplane); the slot is sent once it is sealed and this is 0.
        awaiting: u32,
        /// What the slot counts in the queue's bytes (grows with each fill).
        size: u32,
    },
}

/// What the writer takes out of the outbox.
#[derive(Debug)]
pub enum Outgoing {
    /// Bytes to send as one message in the connection's encoding.
    Message(Bytes),
    /// The connection must be closed with this code.
    Close(CloseCode),
}

/// A connection's socket as the fan-out writes it while the connection's session waits with
/// nothing unwritten ([`Outbox::grant`]): plain TCP, where a `send` that returns has handed
/// its bytes to the kernel.
pub trait Sink: Send + Sync {
    /// Sends `message` (at most the length given to [`Outbox::set_sink`]) as one whole frame
    /// in `encoding`, with one `send`.
    fn send(&self, message: &[u8], encoding: Encoding) -> Sent;
}

/// What a [`Sink`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// All of its frame went.
    Whole,
    /// The connection took only part of the frame: the rest must go out before anything else.
    Part(Bytes),
    /// Nothing was written (the connection would block, or failed: the session's own write
    /// finds out which).
    Nothing,
}

/// The socket lent to the outbox ([`Outbox::set_sink`]) and the longest message sent on it.
struct Lent {
    sink: Arc<dyn Sink>,
    max: u32,
}

impl fmt::Debug for Lent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lent").field("max", &self.max).finish()
    }
}

/// What [`Outbox::pop_small`] found at the head of the queue.
#[derive(Debug)]
pub enum Head {
    /// A message no longer than asked, taken.
    Small(Bytes),
    /// Something else can be sent now (a longer message, a reply, the close): left in place.
    Other,
    /// Nothing can be sent now.
    Nothing,
}

/// The most messages one [`Outbox::flush`] sends: a socket's lock is held across its sends.
pub const FLUSH_MAX: usize = 16;

/// What a reply slot counts in the queue's bytes before it is filled.
const SLOT_SIZE: usize = 256;

/// Queued items up to this many after the start of the mergeable region are scanned for a
/// user's update; a longer region gets an index by identity.
const SCAN_LIMIT: usize = 16;

/// Where a newer update of a user may still be merged into a queued one: the updates queued
/// at or after `from`. Queuing a frame or a reply slot moves `from` past it (a client reads in
/// order, so no update may move ahead of either). A short region is scanned, so the common
/// case allocates nothing; past [`SCAN_LIMIT`] items an index by identity is built, so a long
/// queue does not cost a scan per update.
#[derive(Debug, Default)]
struct Mergeable {
    /// Absolute sequence of the first item of the region.
    from: u64,
    /// Identity -> absolute sequence of its update in the region, built once the region grew
    /// past [`SCAN_LIMIT`] and kept (entries removed as they are sent) until the next barrier
    /// (the queue draining is one).
    // Boxed on purpose: `None` is 8 bytes in every connection, an empty `HashMap` 48.
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<Arc<str>, u64>>>,
}

/// The queued items. Most wake-ups of a writer carry one item: it is kept inline, so a
/// delivery to an idle queue touches no buffer of its own (a cache line fewer on the fan-out
/// side and on the writer's; docs/benchmarks.md, "A delivery's cache misses"). A second item
/// moves both into a ring buffer, which is given back once the queue drains.
#[derive(Debug, Default)]
enum Queue {
    #[default]
    Empty,
    One(Item),
    /// Never empty.
    Many(VecDeque<Item>),
}

impl Queue {
    fn len(&self) -> usize {
        match self {
            Queue::Empty => 0,
            Queue::One(_) => 1,
            Queue::Many(items) => items.len(),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Queue::Empty)
    }

    fn front(&self) -> Option<&Item> {
        self.get(0)
    }

    fn get(&self, i: usize) -> Option<&Item> {
        match self {
            Queue::Empty => None,
            Queue::One(item) => (i == 0).then_some(item),
            Queue::Many(items) => items.get(i),
        }
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut Item> {
        match self {
            Queue::Empty => None,
            Queue::One(item) => (i == 0).then_some(item),
            Queue::Many(items) => items.get_mut(i),
        }
    }

    /// The items from position `start` on.
    fn from(&self, start: usize) -> impl Iterator<Item = &Item> {
        let (one, many) = match self {
            Queue::Empty => (None, None),
            Queue::One(item) => ((start == 0).then_some(item), None),
            Queue::Many(items) => (None, Some(items.range(start.min(items.len())..))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn push_back(&mut self, item: Item) {
        match std::mem::take(self) {
            Queue::Empty => *self = Queue::One(item),
            Queue::One(first) => *self = Queue::Many(VecDeque::from([first, item])),
            Queue::Many(mut items) => {
                items.push_back(item);
                *self = Queue::Many(items);
            }
        }
    }

    fn pop_front(&mut self) -> Option<Item> {
        match self {
            Queue::Empty => None,
            Queue::One(_) => match std::mem::take(self) {
                Queue::One(item) => Some(item),
                _ => unreachable!("matched One"),
            },
            Queue::Many(items) => {
                let item = items.pop_front();
                if items.is_empty() {
                    *self = Queue::Empty;
                }
                item
            }
        }
    }

    /// Items the queue's ring buffer has room for (0 while it holds at most one item).
    #[cfg(test)]
    fn buffer_capacity(&self) -> usize {
        match self {
            Queue::Many(items) => items.capacity(),
            _ => 0,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    items: Queue,
    /// Absolute sequence number of `items[0]`.
    head_seq: u64,
    /// The queued updates a newer one of the same user may replace.
    mergeable: Mergeable,
    /// Approximate bytes held by `items`.
    bytes: usize,
    waker: Option<Waker>,
    close: Option<CloseCode>,
    /// A deadline of the connection's session has come (see [`Outbox::wake_timer`]).
    timer_due: bool,
    /// The connection's socket may have something to read (see [`Outbox::wake_read`]).
    read_due: bool,
    /// The session lent its socket ([`Outbox::grant`]): updates are sent by the fan-out.
    granted: bool,
    /// The socket the session lends, once set ([`Outbox::set_sink`]).
    lent: Option<Lent>,
    /// The unwritten rest of a frame the fan-out sent in part, for the session to write first
    /// ([`Outbox::revoke`]). Boxed: it is rare.
    rest: Option<Box<Bytes>>,
}

impl Inner {
    /// The head of the queue can be sent (a slot only once sealed and answered).
    fn front_ready(&self) -> bool {
        match self.items.front() {
            Some(Item::Slot {
                sealed, awaiting, ..
            }) => *sealed && *awaiting == 0,
            Some(_) => true,
            None => false,
        }
    }

    /// The close to send now that nothing at the head can go: once the queue is empty, or at
    /// once for a slow consumer.
    fn close_due(&self) -> Option<CloseCode> {
        self.close
            .filter(|&code| self.items.is_empty() || code == CloseCode::SlowConsumer)
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Registers `waker` to be woken by the next item, close or event.
    fn register(&mut self, waker: &Waker) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.waker = Some(waker.clone());
        }
    }

    /// The timer and read events reported since they were last taken.
    fn take_events(&mut self) -> Events {
        Events {
            timer: std::mem::take(&mut self.timer_due),
            read: std::mem::take(&mut self.read_due),
        }
    }

    fn push(&mut self, item: Item, size: usize, max_bytes: usize) -> Option<u64> {
        let seq = self.push_quietly(item, size, max_bytes)?;
        self.wake();
        Some(seq)
    }

    /// [`Inner::push`] without waking the writer (an overflow still does).
    fn push_quietly(&mut self, item: Item, size: usize, max_bytes: usize) -> Option<u64> {
        if self.close.is_some() {
            return None;
        }
        self.bytes += size;
        if self.bytes > max_bytes {
            self.overflow();
            return None;
        }
        let seq = self.head_seq + self.items.len() as u64;
        self.items.push_back(item);
        Some(seq)
    }

    /// Ends the mergeable region after the last queued item.
    fn barrier(&mut self) {
        self.mergeable.from = self.head_seq + self.items.len() as u64;
        self.mergeable.index = None;
    }

    /// Position in `items` of the user's update that a newer one may replace.
    fn mergeable_update(&self, identity: &str) -> Option<usize> {
        if let Some(index) = &self.mergeable.index {
            return index
                .get(identity)
                .map(|seq| (seq - self.head_seq) as usize);
        }
        let start = self.mergeable.from.saturating_sub(self.head_seq) as usize;
        let found = self.items.from(start).position(
            |item| matches!(item, Item::Update { update, .. } if update.user.identity == identity),
        );
        found.map(|i| start + i)
    }

    /// Notes an update just queued at `seq` for the index, building the index once the region
    /// has grown past [`SCAN_LIMIT`].
    fn note_update(&mut self, identity: &Arc<str>, seq: u64) {
        if let Some(index) = self.mergeable.index.as_mut() {
            index.insert(Arc::clone(identity), seq);
            return;
        }
        let start = self.mergeable.from.saturating_sub(self.head_seq) as usize;
        if self.items.len().saturating_sub(start) <= SCAN_LIMIT {
            return;
        }
        let index = (start..self.items.len())
            .filter_map(|i| match self.items.get(i) {
                Some(Item::Update { update, .. }) => Some((
                    Arc::from(update.user.identity.as_str()),
                    self.head_seq + i as u64,
                )),
                _ => None,
            })
            .collect();
        self.mergeable.index = Some(Box::new(index));
    }

    fn overflow(&mut self) {
        self.items = Queue::Empty;
        self.barrier();
        self.bytes = 0;
        self.close = Some(CloseCode::SlowConsumer);
        self.granted = false;
        self.wake();
    }

    /// The head's encoded message when it is an update sent as queued or a frame: what the
    /// fan-out or a parked socket may send past the stream (an update whose reasons were
    /// merged with a later one's is encoded anew by the writer; replies, the rest of a frame
    /// and the close are the session's).
    fn front_payload(&self, encoding: Encoding) -> Option<&[u8]> {
        match self.items.front()? {
            Item::Frame(b) => Some(b),
            Item::Update { update, reasons } if *reasons == update.reasons => {
                Some(update.encoded(encoding))
            }
            _ => None,
        }
    }

    /// Takes the head off the queue (there is one), with what it counted in the queue's bytes
    /// and its place in the merge index.
    fn pop_item(&mut self) -> Item {
        let item = self.items.pop_front().expect("an item at the head");
        let seq = self.head_seq;
        self.head_seq += 1;
        let size = match &item {
            Item::Frame(b) => b.len() + 32,
            Item::Update { update, .. } => {
                let identity = update.user.identity.as_str();
                if let Some(index) = self.mergeable.index.as_mut()
                    && index.get(identity) == Some(&seq)
                {
                    index.remove(identity);
                }
                update.approx_size()
            }
            Item::Slot { size, .. } => *size as usize,
        };
        self.bytes = self.bytes.saturating_sub(size);
        if self.items.is_empty() {
            self.bytes = 0;
        }
        item
    }

    fn slot_mut(&mut self, slot: SlotId) -> Option<&mut Item> {
        let idx = slot.0.checked_sub(self.head_seq)? as usize;
        self.items.get_mut(idx)
    }
}

/// What woke a connection's session besides its queue (see [`Outbox::take_events`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    /// A deadline it registered with the shared timers has come.
    pub timer: bool,
    /// Its socket may have something to read.
    pub read: bool,
}

/// What [`Outbox::take`] returns.
#[derive(Debug)]
pub struct Taken {
    /// The next message, or the close, as [`Outbox::pop`] returns it.
    pub next: Option<Outgoing>,
    /// Nothing more can be sent now (the waker is registered): the events since the last
    /// take, as [`Outbox::take_events`] returns them. `None`: more is queued, or the close.
    pub idle: Option<Events>,
}

/// Counts what the outbox did, for the engine's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Queued,
    /// Queued without waking the session, which lent its socket: the caller must see that
    /// [`Outbox::flush`] is called (the engine does so in a task of its own, so the sends run
    /// outside the user's shard lock).
    Held,
    Coalesced,
    Dropped,
}

/// A reserved slot that is sealed when the guard is dropped (from
/// [`Outbox::reserve_guarded`]). The engine's calls take its [`SlotGuard::id`].
#[derive(Debug)]
#[must_use = "dropping the guard seals the slot at once"]
pub struct SlotGuard<'a> {
    outbox: &'a Outbox,
    slot: SlotId,
}

impl SlotGuard<'_> {
    pub fn id(&self) -> SlotId {
        self.slot
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.outbox.seal(self.slot);
    }
}

/// A connection's queue of outgoing frames. See the module doc.
#[derive(Debug)]
pub struct Outbox {
    encoding: Encoding,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl Outbox {
    pub fn new(encoding: Encoding, max_bytes: usize) -> Self {
        Outbox {
            encoding,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue half-updated in a way that
        // matters more than losing the connection, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an already encoded frame. Updates queued before it are no longer merged with
    /// later ones: a client reads them in order, so an update must not move ahead of, say, a
    /// `service_updated` that changes what its flags mean.
    pub fn push_bytes(&self, bytes: Bytes) -> PushOutcome {
        let size = bytes.len() + 32;
        let mut inner = self.lock();
        let outcome = match inner.push(Item::Frame(bytes), size, self.max_bytes) {
            Some(_) => PushOutcome::Queued,
            None => PushOutcome::Dropped,
        };
        inner.barrier();
        outcome
    }

    /// Encodes and queues a frame.
    pub fn push_frame(&self, frame: &ServerFrame) -> PushOutcome {
        self.push_bytes(encode(frame, self.encoding))
    }

    /// Queues a user update, coalescing it with a still-queued update of the same user.
    pub fn push_update(&self, identity: &Arc<str>, update: &Arc<Update>) -> PushOutcome {
        debug_assert_eq!(**identity, *update.user.identity, "the update's own user");
        let mut inner = self.lock();
        if inner.close.is_some() {
            return PushOutcome::Dropped;
        }
        if let Some(idx) = inner.mergeable_update(identity)
            && let Some(Item::Update {
                update: queued,
                reasons,
            }) = inner.items.get_mut(idx)
        {
            *reasons = reasons.union(update.reasons);
            *queued = Arc::clone(update);
            return PushOutcome::Coalesced;
        }
        let item = Item::Update {
            update: Arc::clone(update),
            reasons: update.reasons,
        };
        let held = inner.granted;
        let pushed = match held {
            true => inner.push_quietly(item, update.approx_size(), self.max_bytes),
            false => inner.push(item, update.approx_size(), self.max_bytes),
        };
        match pushed {
            Some(seq) => {
                inner.note_update(identity, seq);
                match held {
                    true => PushOutcome::Held,
                    false => PushOutcome::Queued,
                }
            }
            None => PushOutcome::Dropped,
        }
    }

    /// Sets the socket the session lends while it waits ([`Outbox::grant`]), and the longest
    /// message sent on it (a longer one wakes the session). Once per connection, for plain
    /// TCP only.
    pub fn set_sink(&self, sink: Arc<dyn Sink>, max: usize) {
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        self.lock().lent = Some(Lent { sink, max });
    }

    /// Forgets the lent socket (the session ends: the connection must close with it, not
    /// when the last queued update is dropped).
    pub fn drop_sink(&self) {
        let lent = {
            let mut inner = self.lock();
            inner.granted = false;
            inner.lent.take()
        };
        drop(lent);
    }

    /// The session waits with nothing unwritten and nothing queued that it could send now:
    /// until [`Outbox::revoke`], updates are queued without waking it and sent by whoever
    /// queued them ([`Outbox::flush`]). Nothing is lent without a sink, or once a close was
    /// asked for.
    pub fn grant(&self) {
        let mut inner = self.lock();
        if inner.lent.is_some() && inner.close.is_none() && inner.rest.is_none() {
            inner.granted = true;
        }
    }

    /// The session takes its socket back (before any write or read of its own): a flush
    /// that has not sent yet sends nothing, one under way has finished. Returns the rest of a
    /// frame the socket took only in part ([`Outbox::flush`]): it must go out before anything
    /// else.
    pub fn revoke(&self) -> Option<Bytes> {
        let mut inner = self.lock();
        inner.granted = false;
        inner.rest.take().map(|rest| *rest)
    }

    /// Sends what can go now on the lent socket while the session waits: small updates and
    /// frames at the head, in order, each as one frame. Stops at anything else (a reply still
    /// to be sealed, whose seal wakes the session; a long message; the close), and at the
    /// first message the socket does not take whole: the lending ends, the session is woken,
    /// and takes the frame's rest with [`Outbox::revoke`]. At most [`FLUSH_MAX`] messages go
    /// per call (the lock is held across the sends, and the fan-out queues to this outbox under
    /// a user's shard lock): a longer queue goes to the session. Returns the messages sent
    /// whole.
    pub fn flush(&self) -> usize {
        let mut inner = self.lock();
        // Taken out for the loop (the lock is held throughout), put back after it.
        let Some(lent) = inner.lent.take() else {
            return 0;
        };
        let mut sent = 0;
        while inner.granted && inner.close.is_none() && inner.front_ready() {
            let sent_now = match inner.front_payload(self.encoding) {
                Some(payload) if payload.len() <= lent.max as usize && sent < FLUSH_MAX => {
                    lent.sink.send(payload, self.encoding)
                }
                // Something the session sends itself.
                _ => Sent::Nothing,
            };
            match sent_now {
                Sent::Whole => {
                    inner.pop_item();
                    sent += 1;
                }
                Sent::Part(rest) => {
                    inner.pop_item();
                    inner.rest = Some(Box::new(rest));
                    inner.granted = false;
                    inner.wake();
                }
                Sent::Nothing => {
                    inner.granted = false;
                    inner.wake();
                }
            }
        }
        if inner.items.is_empty() {
            inner.barrier();
        }
        inner.lent = Some(lent);
        sent
    }

    /// Reserves a place in the queue for a reply that is completed later.
    pub fn reserve(&self, frame: SlotFrame) -> Option<SlotId> {
        let item = Item::Slot {
            frame: Box::new(frame),
            sealed: false,
            awaiting: 0,
            size: SLOT_SIZE as u32,
        };
        let mut inner = self.lock();
        let slot = inner.push(item, SLOT_SIZE, self.max_bytes).map(SlotId);
        inner.barrier();
        slot
    }

    /// Reserves a slot as [`Outbox::reserve`] does, held by a guard that seals it when
    /// dropped: every way out of the code that fills it, early returns and errors included,
    /// releases the writer waiting behind it.
    pub fn reserve_guarded(&self, frame: SlotFrame) -> Option<SlotGuard<'_>> {
        self.reserve(frame)
            .map(|slot| SlotGuard { outbox: self, slot })
    }

    /// Puts a user into a reserved slot. Called under the presence map's lock for that user;
    /// later updates of the user are queued behind the slot, never merged into an earlier one
    /// (the slot ends the mergeable region when reserved).
    pub fn fill(&self, slot: SlotId, user: User) {
        let mut inner = self.lock();
        let added = user.attributes.len() + 64;
        if let Some(Item::Slot { frame, size, .. }) = inner.slot_mut(slot) {
            *size = size.saturating_add(u32::try_from(added).unwrap_or(u32::MAX));
            match &mut **frame {
                SlotFrame::Welcome { user: u, .. } => *u = Some(user),
                SlotFrame::Subscribed { users, .. } => users.push(user),
            }
            inner.bytes += added;
        }
    }

    /// Adds a per-identity error to a reserved `subscribed` slot.
    pub fn add_error(&self, slot: SlotId, error: IdentityError) {
        let mut inner = self.lock();
        if let Some(Item::Slot { frame, .. }) = inner.slot_mut(slot)
            && let SlotFrame::Subscribed { errors, .. } = &mut **frame
        {
            errors.push(error);
        }
    }

    /// Announces a fill that will come later from elsewhere: the slot is held back, even once
    /// sealed, until [`Outbox::release`] is called as often as this.
    pub fn expect(&self, slot: SlotId) {
        let mut inner = self.lock();
        if let Some(Item::Slot { awaiting, .. }) = inner.slot_mut(slot) {
            *awaiting += 1;
        }
    }

    /// Ends one expected fill (after [`Outbox::fill`], or without it when the wait was given up).
    pub fn release(&self, slot: SlotId) {
        let mut inner = self.lock();
        if let Some(Item::Slot { awaiting, .. }) = inner.slot_mut(slot) {
            *awaiting = awaiting.saturating_sub(1);
        }
        inner.wake();
    }

    /// Marks a slot complete: the writer may send it.
    pub fn seal(&self, slot: SlotId) {
        let mut inner = self.lock();
        if let Some(Item::Slot { sealed, .. }) = inner.slot_mut(slot) {
            *sealed = true;
        }
        inner.wake();
    }

    /// Asks the connection to close with `code`; queued frames are still sent first unless the
    /// code is 4009 (the queue was dropped).
    pub fn close(&self, code: CloseCode) {
        let mut inner = self.lock();
        if inner.close.is_none() {
            inner.close = Some(code);
        }
        inner.granted = false;
        inner.wake();
    }

    /// Tells the connection's session that a deadline it registered has come, waking its
    /// task (the gateway's shared socket timers use this instead of a timer per socket).
    pub fn wake_timer(&self) {
        let mut inner = self.lock();
        inner.timer_due = true;
        inner.wake();
    }

    /// Gives back what an empty queue still holds (a quiet connection's session calls it as it
    /// parks its socket): the mergeable region's index, if a long queue left one. A drained
    /// queue holds no buffer.
    pub fn shrink(&self) {
        let mut inner = self.lock();
        if inner.items.is_empty() {
            inner.barrier();
        }
    }

    /// Tells the connection's session that its socket may have something to read, waking its
    /// task. The session polls the socket's reads with the connection as waker (see `Conn`'s
    /// `Wake`), so a wake-up that only the queue caused does not poll the read side.
    pub fn wake_read(&self) {
        let mut inner = self.lock();
        inner.read_due = true;
        inner.wake();
    }

    /// Takes what [`Outbox::wake_timer`] and [`Outbox::wake_read`] reported since the last
    /// call, and registers `waker` to be woken by the next of those (or by the next item or
    /// close, as with [`Outbox::pop`]).
    pub fn take_events(&self, waker: &Waker) -> Events {
        let mut inner = self.lock();
        inner.register(waker);
        inner.take_events()
    }

    /// Takes the next message, or registers `waker` to be woken when there is one.
    ///
    /// Returns `None` when nothing can be sent now (empty, or an unsealed slot at the head).
    pub fn pop(&self, waker: &Waker) -> Option<Outgoing> {
        let mut inner = self.lock();
        match self.next_locked(&mut inner) {
            None => self.idle_locked(&mut inner, waker),
            some => some,
        }
    }

    /// [`Outbox::pop`] and, once nothing more can be sent now, what
    /// [`Outbox::take_events`] returns, in one lock: a writer's wake-up for one message takes
    /// the queue's lock once instead of three times (pop, pop again, events).
    pub fn take(&self, waker: &Waker) -> Taken {
        let mut inner = self.lock();
        let next = self.next_locked(&mut inner);
        if inner.front_ready() {
            return Taken { next, idle: None };
        }
        // Nothing more can go now: what the next pop would do, done here.
        match (next, self.idle_locked(&mut inner, waker)) {
            // A due close goes on its own call, after the message.
            (Some(message), Some(_)) => Taken {
                next: Some(message),
                idle: None,
            },
            // A close ends the connection: no events are taken.
            (None, Some(close)) => Taken {
                next: Some(close),
                idle: None,
            },
            (next, _) => Taken {
                next,
                idle: Some(inner.take_events()),
            },
        }
    }

    /// Nothing can be sent now: the close if it is due; else registers `waker` and, when the
    /// queue is empty, ends the mergeable region.
    fn idle_locked(&self, inner: &mut Inner, waker: &Waker) -> Option<Outgoing> {
        if let Some(code) = inner.close_due() {
            return Some(Outgoing::Close(code));
        }
        inner.register(waker);
        if inner.items.is_empty() {
            // Nothing left to merge with: the region's index, if any, goes too.
            inner.barrier();
        }
        None
    }

    /// The message at the head, taken, if it can be sent now.
    fn next_locked(&self, inner: &mut Inner) -> Option<Outgoing> {
        if !inner.front_ready() {
            return None;
        }
        Some(match inner.pop_item() {
            Item::Frame(b) => Outgoing::Message(b),
            Item::Update { update, reasons } => Outgoing::Message(if reasons == update.reasons {
                update.bytes(self.encoding)
            } else {
                encode(&update.frame(reasons), self.encoding)
            }),
            Item::Slot { frame, size, .. } => {
                let frame = (*frame).into_frame();
                // The slot's count (64 bytes and the attributes per user) runs a little below
                // a user's encoded size; an eighth more spares the buffer its doublings, and
                // keeps a room's reply (10 users) under 1 KiB, which malloc serves from its
                // per-thread cache.
                let capacity = size as usize + size as usize / 8;
                Outgoing::Message(encode_sized(&frame, self.encoding, capacity))
            }
        })
    }

    /// Takes the message at the head if it can be sent now and is at most `max` bytes long
    /// (an update or a frame; replies, an update whose reasons were merged with a later one's,
    /// and the close are left for [`Outbox::pop`]), without registering a waker: for a parked
    /// socket, which writes such messages without its stream (its waker is registered by
    /// [`Outbox::take_events`] first). Once the queue is empty, the mergeable region ends, as
    /// with [`Outbox::pop`].
    pub fn pop_small(&self, max: usize) -> Head {
        let mut inner = self.lock();
        if !inner.front_ready() {
            return match inner.close_due() {
                Some(_) => Head::Other,
                None => Head::Nothing,
            };
        }
        if inner
            .front_payload(self.encoding)
            .is_none_or(|payload| payload.len() > max)
        {
            return Head::Other;
        }
        let next = self.next_locked(&mut inner);
        if inner.items.is_empty() {
            // Nothing left to merge with: the region's index, if any, goes too.
            inner.barrier();
        }
        match next {
            Some(Outgoing::Message(bytes)) => Head::Small(bytes),
            _ => Head::Other,
        }
    }

    /// Whether [`Outbox::pop`] would return something now (a message or the close), without
    /// taking it or registering a waker.
    pub fn has_outgoing(&self) -> bool {
        let inner = self.lock();
        inner.front_ready() || inner.close_due().is_some()
    }

    /// Number of queued items (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::UpdateReason;
    use reach_proto::decode_server;
    use std::task::Waker;

    fn reasons_of(frame: &ServerFrame) -> Vec<UpdateReason> {
        match frame {
            ServerFrame::UserUpdated { reasons, .. } => reasons.clone(),
            _ => Vec::new(),
        }
    }

    fn user(identity: &str, online: bool) -> User {
        User {
            identity: identity.into(),
            friendly_name: None,
            attributes: "{}".into(),
            is_online: Some(online),
            is_notifiable: None,
            last_seen_at: None,
        }
    }

    /// A presence change of `identity` (reason `reachabilityOnline`).
    /// Queues an online update of each of `n` users `u0`, `u1`...; returns their identities.
    fn queue_users(outbox: &Outbox, n: usize) -> Vec<Arc<str>> {
        let ids: Vec<Arc<str>> = (0..n).map(|i| Arc::from(format!("u{i}"))).collect();
        for id in &ids {
            assert_eq!(
                outbox.push_update(id, &presence(id, true)),
                PushOutcome::Queued
            );
        }
        ids
    }

    fn presence(identity: &str, online: bool) -> Arc<Update> {
        Update::new(
            user(identity, online),
            Reasons::of(UpdateReason::ReachabilityOnline),
        )
    }

    fn drain(outbox: &Outbox) -> Vec<ServerFrame> {
        let mut out = Vec::new();
        while let Some(Outgoing::Message(b)) = outbox.pop(Waker::noop()) {
            out.push(decode_server(&b, outbox.encoding()).unwrap());
        }
        out
    }

    #[test]
    fn pending_updates_of_one_user_coalesce_with_merged_reasons() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let bob: Arc<str> = Arc::from("bob");
        let carol: Arc<str> = Arc::from("carol");
        let u1 = presence("bob", true);
        let u2 = presence("carol", true);
        let mut u3u = user("bob", false);
        u3u.friendly_name = Some("Bob".into());
        let u3 = Update::new(u3u, Reasons::of(UpdateReason::FriendlyName));
        assert_eq!(outbox.push_update(&bob, &u1), PushOutcome::Queued);
        assert_eq!(outbox.push_update(&carol, &u2), PushOutcome::Queued);
        assert_eq!(outbox.push_update(&bob, &u3), PushOutcome::Coalesced);
        let frames = drain(&outbox);
        assert_eq!(frames.len(), 2);
        match &frames[0] {
            ServerFrame::UserUpdated { user, reasons } => {
                assert_eq!(user.identity, "bob");
                assert_eq!(user.is_online, Some(false), "latest state kept");
                assert_eq!(user.friendly_name.as_deref(), Some("Bob"));
                assert_eq!(
                    reasons,
                    &vec![UpdateReason::FriendlyName, UpdateReason::ReachabilityOnline]
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        // After the first was sent, a new update is queued again, not merged.
        assert_eq!(outbox.push_update(&bob, &u1), PushOutcome::Queued);
    }

    #[test]
    fn one_item_is_kept_inline_and_a_drained_queue_holds_no_buffer() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let bob: Arc<str> = Arc::from("bob");
        let on = presence("bob", true);
        outbox.push_update(&bob, &on);
        assert_eq!(outbox.lock().items.buffer_capacity(), 0, "one item: inline");
        assert_eq!(outbox.push_update(&bob, &on), PushOutcome::Coalesced);
        assert_eq!(outbox.len(), 1);
        assert!(outbox.pop(Waker::noop()).is_some());
        assert!(outbox.pop(Waker::noop()).is_none());
        // Two items share a buffer, given back as the second is taken; order is kept.
        outbox.push_frame(&ServerFrame::Pong { id: 1 });
        outbox.push_frame(&ServerFrame::Pong { id: 2 });
        assert!(outbox.lock().items.buffer_capacity() >= 2);
        let frames = drain(&outbox);
        assert!(matches!(
            frames[..],
            [ServerFrame::Pong { id: 1 }, ServerFrame::Pong { id: 2 }]
        ));
        assert_eq!(outbox.lock().items.buffer_capacity(), 0);
        // Merging still works after it.
        assert_eq!(outbox.push_update(&bob, &on), PushOutcome::Queued);
        assert_eq!(outbox.push_update(&bob, &on), PushOutcome::Coalesced);
    }

    #[test]
    fn a_burst_gives_its_memory_back_as_the_queue_drains() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        queue_users(&outbox, SCAN_LIMIT * 2);
        assert!(
            outbox.lock().mergeable.index.is_some(),
            "a long region is indexed"
        );
        while outbox.pop(Waker::noop()).is_some() {}
        let inner = outbox.lock();
        assert_eq!(
            inner.items.buffer_capacity(),
            0,
            "a burst's buffer is not kept"
        );
        assert!(inner.mergeable.index.is_none(), "nor its index");
    }

    /// The queue holding one item inline costs no more than a ring buffer's header did, less
    /// the item.
    #[test]
    fn the_queue_is_as_small_as_one_item() {
        assert_eq!(std::mem::size_of::<Queue>(), std::mem::size_of::<Item>());
    }

    #[test]
    fn a_guarded_slot_is_sealed_on_every_way_out() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let fill = |fail: bool| -> Result<(), ()> {
            let slot = outbox
                .reserve_guarded(SlotFrame::Subscribed {
                    id: 7,
                    users: vec![],
                    errors: vec![],
                })
                .unwrap();
            if fail {
                return Err(());
            }
            outbox.fill(slot.id(), user("bob", true));
            Ok(())
        };
        assert!(fill(true).is_err());
        outbox.push_frame(&ServerFrame::Pong { id: 1 });
        assert!(fill(false).is_ok());
        let frames = drain(&outbox);
        assert!(
            matches!(&frames[..], [
                ServerFrame::Subscribed { id: 7, users: a, .. },
                ServerFrame::Pong { id: 1 },
                ServerFrame::Subscribed { id: 7, users: b, .. },
            ] if a.is_empty() && b.len() == 1),
            "{frames:?}"
        );
    }

    #[test]
    fn a_frame_queued_after_an_update_stops_it_from_being_replaced() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let bob: Arc<str> = Arc::from("bob");
        let on = presence("bob", true);
        let off = presence("bob", false);
        assert_eq!(outbox.push_update(&bob, &on), PushOutcome::Queued);
        outbox.push_frame(&ServerFrame::Pong { id: 1 });
        assert_eq!(outbox.push_update(&bob, &off), PushOutcome::Queued);
        assert_eq!(outbox.push_update(&bob, &on), PushOutcome::Coalesced);
        let frames = drain(&outbox);
        assert_eq!(frames.len(), 3);
        assert!(
            matches!(&frames[0], ServerFrame::UserUpdated { user, .. } if user.is_online == Some(true))
        );
        assert!(matches!(&frames[1], ServerFrame::Pong { id: 1 }));
        assert!(
            matches!(&frames[2], ServerFrame::UserUpdated { user, .. } if user.is_online == Some(true))
        );
    }

    #[test]
    fn a_long_queue_still_merges_every_user_once_and_in_place() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let n = SCAN_LIMIT * 3;
        let ids = queue_users(&outbox, n);
        // Send a few, so the index's sequences must be read against a moved head.
        for _ in 0..5 {
            assert!(outbox.pop(Waker::noop()).is_some());
        }
        for (i, id) in ids.iter().enumerate() {
            let u = presence(id, false);
            let expected = if i < 5 {
                PushOutcome::Queued
            } else {
                PushOutcome::Coalesced
            };
            assert_eq!(outbox.push_update(id, &u), expected, "{id}");
        }
        let frames = drain(&outbox);
        assert_eq!(frames.len(), n);
        let order: Vec<(String, Option<bool>)> = frames
            .iter()
            .map(|f| match f {
                ServerFrame::UserUpdated { user, .. } => (user.identity.clone(), user.is_online),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let expected: Vec<(String, Option<bool>)> = (5..n)
            .chain(0..5)
            .map(|i| (format!("u{i}"), Some(false)))
            .collect();
        assert_eq!(
            order, expected,
            "merged in place, the sent five queued anew"
        );
    }

    #[test]
    fn writer_waits_for_an_unsealed_slot_and_updates_queue_behind_it() {
        let outbox = Outbox::new(Encoding::MsgPack, 1 << 20);
        let bob: Arc<str> = Arc::from("bob");
        let old = presence("bob", false);
        outbox.push_update(&bob, &old);
        let slot = outbox
            .reserve(SlotFrame::Subscribed {
                id: 9,
                users: vec![],
                errors: vec![],
            })
            .unwrap();
        outbox.fill(slot, user("bob", true));
        let newer = Update::new(user("bob", true), Reasons::of(UpdateReason::FriendlyName));
        assert_eq!(
            outbox.push_update(&bob, &newer),
            PushOutcome::Queued,
            "not merged forward"
        );
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Message(_))
        ));
        assert!(outbox.pop(Waker::noop()).is_none(), "slot not sealed yet");
        outbox.seal(slot);
        let rest = drain(&outbox);
        assert!(
            matches!(&rest[0], ServerFrame::Subscribed { id: 9, users, .. } if users[0].is_online == Some(true))
        );
        assert_eq!(reasons_of(&rest[1]), vec![UpdateReason::FriendlyName]);
    }

    /// `has_outgoing` (what a parked socket checks) says what `pop` would do, and takes nothing.
    #[test]
    fn small_messages_are_taken_and_the_rest_left_for_pop() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        assert!(matches!(outbox.pop_small(1000), Head::Nothing));
        // A burst past the scan limit builds the merge index; draining it with pop_small
        // ends the region, as pop does, so no index stays with an idle socket.
        let users = queue_users(&outbox, SCAN_LIMIT + 4);
        assert!(outbox.lock().mergeable.index.is_some());
        for id in &users {
            match outbox.pop_small(1000) {
                Head::Small(bytes) => {
                    let frame = decode_server(&bytes, Encoding::Json).unwrap();
                    assert!(
                        matches!(&frame, ServerFrame::UserUpdated { user, .. } if user.identity == **id),
                        "{frame:?}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(outbox.pop_small(1000), Head::Nothing));
        assert!(outbox.lock().mergeable.index.is_none());
        // Longer than asked: left in place for pop.
        let bob: Arc<str> = Arc::from("bob");
        outbox.push_update(&bob, &presence("bob", true));
        assert!(matches!(outbox.pop_small(10), Head::Other));
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Message(_))
        ));
        // An update whose reasons were merged with a newer one's: encoded by pop.
        let carol: Arc<str> = Arc::from("carol");
        outbox.push_update(&carol, &presence("carol", true));
        let renamed = Update::new(user("carol", true), Reasons::of(UpdateReason::FriendlyName));
        assert_eq!(outbox.push_update(&carol, &renamed), PushOutcome::Coalesced);
        assert!(matches!(outbox.pop_small(1000), Head::Other));
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Message(_))
        ));
        // A reply slot, and the close once the queue is empty.
        let slot = outbox
            .reserve(SlotFrame::Subscribed {
                id: 1,
                users: vec![],
                errors: vec![],
            })
            .unwrap();
        outbox.seal(slot);
        assert!(matches!(outbox.pop_small(1000), Head::Other));
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Message(_))
        ));
        outbox.close(CloseCode::Normal);
        assert!(matches!(outbox.pop_small(1000), Head::Other));
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Close(CloseCode::Normal))
        ));
    }

    #[test]
    fn has_outgoing_answers_as_pop_would() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        assert!(!outbox.has_outgoing(), "empty");
        let slot = outbox
            .reserve(SlotFrame::Subscribed {
                id: 1,
                users: vec![],
                errors: vec![],
            })
            .unwrap();
        outbox.push_frame(&ServerFrame::Pong { id: 2 });
        assert!(!outbox.has_outgoing(), "an unsealed slot at the head");
        assert!(outbox.pop(Waker::noop()).is_none());
        outbox.seal(slot);
        assert!(outbox.has_outgoing());
        assert!(outbox.has_outgoing(), "nothing was taken");
        assert_eq!(drain(&outbox).len(), 2);
        assert!(!outbox.has_outgoing(), "drained");
        outbox.close(CloseCode::Normal);
        assert!(outbox.has_outgoing(), "the close is due");
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Close(CloseCode::Normal))
        ));
    }

    #[test]
    fn overflow_drops_the_queue_and_asks_for_4009() {
        let outbox = Outbox::new(Encoding::Json, 1000);
        for _ in 0..10 {
            outbox.push_bytes(Bytes::from(vec![b'x'; 200]));
        }
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Close(CloseCode::SlowConsumer))
        ));
        assert_eq!(
            outbox.push_bytes(Bytes::from_static(b"x")),
            PushOutcome::Dropped
        );
    }

    /// A waker that counts its wake-ups.
    /// A sink that takes `room` bytes of frames in all, then would block; it records what
    /// it took (the message of each whole frame, and the bytes of a frame taken in part).
    #[derive(Default)]
    struct TestSink {
        room: Mutex<usize>,
        whole: Mutex<Vec<Vec<u8>>>,
    }

    impl Sink for TestSink {
        fn send(&self, message: &[u8], _: Encoding) -> Sent {
            // A 2-byte header stands for the frame's.
            let frame = message.len() + 2;
            let mut room = self.room.lock().unwrap();
            match *room {
                0 => Sent::Nothing,
                n if n >= frame => {
                    *room -= frame;
                    self.whole.lock().unwrap().push(message.to_vec());
                    Sent::Whole
                }
                n => {
                    *room = 0;
                    Sent::Part(Bytes::from(vec![b'x'; frame - n]))
                }
            }
        }
    }

    fn lent_outbox(room: usize) -> (Outbox, Arc<TestSink>) {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let sink = Arc::new(TestSink {
            room: Mutex::new(room),
            ..TestSink::default()
        });
        outbox.set_sink(Arc::clone(&sink) as Arc<dyn Sink>, 1000);
        (outbox, sink)
    }

    fn identity_of(frame: ServerFrame) -> String {
        match frame {
            ServerFrame::UserUpdated { user, .. } => user.identity,
            other => panic!("{other:?}"),
        }
    }

    /// The identities of the updates the session would send now.
    fn drained_identities(outbox: &Outbox) -> Vec<String> {
        drain(outbox).into_iter().map(identity_of).collect()
    }

    /// The session waits (its waker registered, counting wake-ups) and lends the socket.
    fn wait_lent(outbox: &Outbox) -> (Arc<CountWakes>, Waker) {
        let (wakes, waker) = counting_waker();
        assert!(outbox.pop(&waker).is_none());
        outbox.grant();
        (wakes, waker)
    }

    /// Queues an update of each user to the lent outbox: held, for the fan-out to send.
    fn hold<S: AsRef<str>>(outbox: &Outbox, identities: &[S]) {
        for id in identities {
            let id: Arc<str> = Arc::from(id.as_ref());
            let update = presence(&id, true);
            assert_eq!(outbox.push_update(&id, &update), PushOutcome::Held);
        }
    }

    #[test]
    fn a_lent_socket_gets_updates_from_the_fan_out_without_a_wake_up() {
        let (outbox, sink) = lent_outbox(1 << 20);
        let (wakes, waker) = counting_waker();
        assert!(outbox.pop(&waker).is_none());
        // Not lent yet: the update wakes the session.
        let alice: Arc<str> = Arc::from("alice");
        assert_eq!(
            outbox.push_update(&alice, &presence("alice", true)),
            PushOutcome::Queued
        );
        assert_eq!(wakes.get(), 1);
        assert!(outbox.pop(&waker).is_some());
        assert!(outbox.pop(&waker).is_none());
        outbox.grant();
        hold(&outbox, &["bob", "carol", "dave"]);
        assert_eq!(wakes.get(), 1, "held updates wake nobody");
        assert_eq!(outbox.flush(), 3);
        assert_eq!(wakes.get(), 1);
        assert!(outbox.is_empty());
        let sent: Vec<String> = sink
            .whole
            .lock()
            .unwrap()
            .iter()
            .map(|m| identity_of(decode_server(m, Encoding::Json).unwrap()))
            .collect();
        assert_eq!(sent, ["bob", "carol", "dave"]);
        // Taken back: the next update wakes the session again, and a flush sends nothing.
        assert_eq!(outbox.revoke(), None);
        assert_eq!(
            outbox.push_update(&alice, &presence("alice", false)),
            PushOutcome::Queued
        );
        assert_eq!(outbox.flush(), 0);
        assert_eq!(wakes.get(), 2);
        assert_eq!(outbox.len(), 1);
    }

    #[test]
    fn a_frame_taken_in_part_ends_the_lending_and_its_rest_goes_first() {
        // Room for the first update's frame and part of the second's.
        let first = presence("bob", true).bytes(Encoding::Json).len() + 2;
        let (outbox, sink) = lent_outbox(first + 5);
        let (wakes, _waker) = wait_lent(&outbox);
        hold(&outbox, &["bob", "carl", "dave"]);
        assert_eq!(outbox.flush(), 1);
        assert_eq!(wakes.get(), 1, "the session is woken for the rest");
        let rest = outbox.revoke().expect("the rest of carl's frame");
        let carl = presence("carl", true).bytes(Encoding::Json).len() + 2;
        assert_eq!(rest.len(), carl - 5);
        // What follows the rest is the session's: dave only.
        assert_eq!(drained_identities(&outbox), ["dave"]);
        assert_eq!(sink.whole.lock().unwrap().len(), 1);
        // Lent again: the rest was taken, so the socket may be lent.
        outbox.grant();
        hold(&outbox, &["bob"]);
    }

    #[test]
    fn one_flush_sends_at_most_flush_max_and_leaves_the_rest_to_the_session() {
        let (outbox, sink) = lent_outbox(1 << 20);
        let (wakes, _waker) = wait_lent(&outbox);
        let users: Vec<String> = (0..FLUSH_MAX + 3).map(|i| format!("user{i}")).collect();
        hold(&outbox, &users);
        assert_eq!(outbox.flush(), FLUSH_MAX);
        assert_eq!(wakes.get(), 1, "the session is woken for the rest");
        assert_eq!(sink.whole.lock().unwrap().len(), FLUSH_MAX);
        assert_eq!(outbox.revoke(), None);
        assert_eq!(drained_identities(&outbox), users[FLUSH_MAX..]);
    }

    #[test]
    fn a_socket_that_takes_nothing_leaves_the_update_queued_for_the_session() {
        let (outbox, sink) = lent_outbox(0);
        let (wakes, _waker) = wait_lent(&outbox);
        hold(&outbox, &["bob"]);
        assert_eq!(outbox.flush(), 0);
        assert_eq!(wakes.get(), 1);
        assert_eq!(outbox.revoke(), None);
        assert!(sink.whole.lock().unwrap().is_empty());
        assert_eq!(drain(&outbox).len(), 1);
    }

    #[test]
    fn the_fan_out_sends_nothing_past_what_the_session_must_send() {
        let (outbox, sink) = lent_outbox(1 << 20);
        let (wakes, waker) = counting_waker();
        // A reply not sealed yet: updates queue behind it, and neither goes.
        let slot = outbox
            .reserve(SlotFrame::Subscribed {
                id: 7,
                users: vec![],
                errors: vec![],
            })
            .unwrap();
        assert!(outbox.pop(&waker).is_none());
        outbox.grant();
        hold(&outbox, &["bob"]);
        assert_eq!(outbox.flush(), 0);
        assert!(sink.whole.lock().unwrap().is_empty());
        // Its seal wakes the session, which sends both.
        outbox.seal(slot);
        assert_eq!(wakes.get(), 1);
        assert_eq!(outbox.revoke(), None);
        assert_eq!(drain(&outbox).len(), 2);
        // A message longer than the sink's limit goes to the session.
        assert!(outbox.pop(&waker).is_none());
        outbox.grant();
        let long = Update::new(
            User {
                attributes: format!("{{\"a\":\"{}\"}}", "x".repeat(1000)),
                ..user("carol", true)
            },
            Reasons::of(UpdateReason::Attributes),
        );
        let carol: Arc<str> = Arc::from("carol");
        assert_eq!(outbox.push_update(&carol, &long), PushOutcome::Held);
        assert_eq!(outbox.flush(), 0);
        assert_eq!(wakes.get(), 2);
        assert!(sink.whole.lock().unwrap().is_empty());
        assert_eq!(outbox.revoke(), None);
        assert_eq!(drain(&outbox).len(), 1);
        // No lending once a close was asked for, nor without a sink.
        outbox.grant();
        outbox.close(CloseCode::Normal);
        assert!(!outbox.lock().granted);
        outbox.grant();
        assert!(!outbox.lock().granted);
        let bob: Arc<str> = Arc::from("bob");
        let plain = Outbox::new(Encoding::Json, 1 << 20);
        plain.grant();
        assert_eq!(
            plain.push_update(&bob, &presence("bob", true)),
            PushOutcome::Queued
        );
        // A dropped sink ends the lending.
        let (outbox, _) = lent_outbox(1 << 20);
        outbox.grant();
        outbox.drop_sink();
        assert_eq!(
            outbox.push_update(&bob, &presence("bob", true)),
            PushOutcome::Queued
        );
    }

    fn counting_waker() -> (Arc<CountWakes>, Waker) {
        let count = Arc::new(CountWakes::default());
        (Arc::clone(&count), Waker::from(count))
    }

    #[derive(Default)]
    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl CountWakes {
        fn get(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn read_and_timer_events_wake_the_task_and_are_taken_once() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let (count, waker) = counting_waker();
        assert_eq!(outbox.take_events(&waker), Events::default());
        outbox.wake_read();
        assert_eq!(count.get(), 1, "the registered task is woken");
        outbox.wake_timer();
        assert_eq!(
            count.get(),
            1,
            "a wake-up takes the waker: one per registration"
        );
        let events = outbox.take_events(&waker);
        assert_eq!(
            events,
            Events {
                timer: true,
                read: true
            }
        );
        assert_eq!(outbox.take_events(&waker), Events::default(), "taken once");
        outbox.push_frame(&ServerFrame::Pong { id: 1 });
        assert_eq!(count.get(), 2, "take_events registered it again");
    }

    #[test]
    fn updates_after_a_reserved_slot_queue_behind_it_and_merge_there() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let bob: Arc<str> = Arc::from("bob");
        let before = presence("bob", true);
        assert_eq!(outbox.push_update(&bob, &before), PushOutcome::Queued);
        let slot = outbox
            .reserve(SlotFrame::Subscribed {
                id: 3,
                users: vec![],
                errors: vec![],
            })
            .unwrap();
        // Published between the reservation and the fill (bob's lock is taken by each).
        let off = presence("bob", false);
        assert_eq!(outbox.push_update(&bob, &off), PushOutcome::Queued);
        outbox.fill(slot, user("bob", false));
        outbox.seal(slot);
        let on = presence("bob", true);
        assert_eq!(outbox.push_update(&bob, &on), PushOutcome::Coalesced);
        let frames = drain(&outbox);
        assert_eq!(frames.len(), 3);
        assert!(
            matches!(&frames[0], ServerFrame::UserUpdated { user, .. } if user.is_online == Some(true))
        );
        assert!(
            matches!(&frames[1], ServerFrame::Subscribed { id: 3, users, .. } if users[0].is_online == Some(false))
        );
        assert!(
            matches!(&frames[2], ServerFrame::UserUpdated { user, .. } if user.is_online == Some(true)),
            "the latest state comes last"
        );
    }

    #[test]
    fn a_frame_after_a_long_queue_ends_merging_into_it() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let ids = queue_users(&outbox, SCAN_LIMIT + 2);
        assert!(
            outbox.lock().mergeable.index.is_some(),
            "past the scan limit"
        );
        outbox.push_frame(&ServerFrame::Pong { id: 1 });
        assert!(
            outbox.lock().mergeable.index.is_none(),
            "the frame drops it"
        );
        for id in &ids {
            let u = presence(id, false);
            assert_eq!(outbox.push_update(id, &u), PushOutcome::Queued, "{id}");
        }
        for id in &ids {
            let u = presence(id, true);
            assert_eq!(outbox.push_update(id, &u), PushOutcome::Coalesced, "{id}");
        }
        assert_eq!(drain(&outbox).len(), 2 * ids.len() + 1);
    }

    #[test]
    fn a_filled_slot_gives_back_the_bytes_it_was_counted_for() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        outbox.push_frame(&ServerFrame::Pong { id: 1 });
        let slot = outbox
            .reserve(SlotFrame::Subscribed {
                id: 2,
                users: vec![],
                errors: vec![],
            })
            .unwrap();
        let mut big = user("bob", true);
        big.attributes = format!("{{\"bio\":\"{}\"}}", "x".repeat(10_000));
        outbox.fill(slot, big);
        outbox.seal(slot);
        outbox.push_frame(&ServerFrame::Pong { id: 3 });
        let last = encode(&ServerFrame::Pong { id: 3 }, Encoding::Json).len() + 32;
        assert!(outbox.pop(Waker::noop()).is_some());
        assert!(outbox.pop(Waker::noop()).is_some());
        assert_eq!(
            outbox.lock().bytes,
            last,
            "only the last pong is still counted"
        );
    }

    #[test]
    fn close_is_reported_after_queued_frames() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        outbox.push_frame(&ServerFrame::Pong { id: 1 });
        outbox.close(CloseCode::Forbidden);
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Message(_))
        ));
        assert!(matches!(
            outbox.pop(Waker::noop()),
            Some(Outgoing::Close(CloseCode::Forbidden))
        ));
    }

    /// `take` hands out what `pop` would, and once nothing more can go now (after the last
    /// message, or with nothing at all) also the events, registering the waker as `pop` and
    /// `take_events` would; never with more queued or with the close.
    #[test]
    fn take_gives_the_events_with_the_last_message_for_now() {
        let outbox = Outbox::new(Encoding::Json, 1 << 20);
        let (count, waker) = counting_waker();
        let none = outbox.take(&waker);
        assert!(none.next.is_none());
        assert_eq!(none.idle, Some(Events::default()), "nothing: idle at once");
        outbox.push_frame(&ServerFrame::Pong { id: 1 });
        assert_eq!(count.get(), 1, "take registered the waker");
        outbox.push_frame(&ServerFrame::Pong { id: 2 });
        outbox.wake_timer();
        let first = outbox.take(&waker);
        assert!(matches!(first.next, Some(Outgoing::Message(_))));
        assert_eq!(first.idle, None, "one more queued: events stay");
        let last = outbox.take(&waker);
        assert!(matches!(last.next, Some(Outgoing::Message(_))));
        let events = Events {
            timer: true,
            read: false,
        };
        assert_eq!(
            last.idle,
            Some(events),
            "the last message brings the events"
        );
        assert_eq!(outbox.take_events(&waker), Events::default(), "taken once");
        let before = count.get();
        outbox.wake_read();
        assert_eq!(count.get(), before + 1, "registered again");

        // An unsealed slot at the head: nothing can go, idle; the close waits for it.
        let slot = outbox
            .reserve(SlotFrame::Subscribed {
                id: 1,
                users: Vec::new(),
                errors: Vec::new(),
            })
            .expect("reserved");
        outbox.close(CloseCode::Normal);
        let blocked = outbox.take(&waker);
        assert!(blocked.next.is_none());
        assert_eq!(blocked.idle.map(|e| e.read), Some(true));
        outbox.seal(slot);
        let reply = outbox.take(&waker);
        assert!(matches!(reply.next, Some(Outgoing::Message(_))));
        assert_eq!(reply.idle, None, "the close is due: no events with it");
        let close = outbox.take(&waker);
        assert!(matches!(
            close.next,
            Some(Outgoing::Close(CloseCode::Normal))
        ));
        assert_eq!(close.idle, None);
    }
}
