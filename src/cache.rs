//! The token cache in front of a [`TokenSource`](crate::TokenSource): single-flight,
//! refresh-ahead, and correct when callers are cancelled.
//!
//! # How a request finds its token
//!
//! The cache publishes one atomic word: the generation of the current token, its phase, and
//! its slot in the process-wide table of interned credential values (see
//! [`credentials`](crate::credentials)), whose entries are set once and never change. A
//! request that finds a usable word reads its token from that slot: two atomic loads, no
//! lock, and no write to memory shared between threads, whichever service clone it comes
//! through. Only when the word says otherwise does the request take the lock ("the slow
//! path").
//!
//! Timer tasks on the Tokio runtime move the word through its phases at the token's
//! deadlines; for a token that expires, the fast path also compares the clock with the
//! published deadline, so that a timer running late never lets an expired token through:
//!
//! * `FRESH`: use the token.
//! * `STALE`: inside the refresh-ahead window. Use the token; the first request to see this
//!   phase turns it back to `FRESH` and starts a background fetch.
//! * `UNUSABLE`: no token, or inside the expiry margin, or dropped after a rejection. Requests
//!   take the slow path, which reads the clock and waits for a fetch if it must.
//!
//! # Fetches
//!
//! A fetch runs in a task of its own, spawned by whoever first needed it. Requests that need
//! a token while it runs register as waiters and are woken with its result; dropping any of
//! them, including the one that started it, changes nothing for the fetch or the others.
//! If the task itself is dropped before it finishes (its runtime shut down), its waiters get
//! [`Error::FetchAbandoned`] and the next request starts a new fetch; a refresh dropped while
//! the token was still usable starts again after a backoff, as after a failure. A panic in
//! the source is a failure too, caught where the source is polled.
//!
//! A fetch that has not answered a second past its timeout runs on a runtime that no longer
//! makes progress. The next request that needs a token starts another fetch on its own
//! runtime, which takes over the waiters. Fetches are numbered as they start. Should the
//! stuck one answer after all, its token is used unless a later fetch already stored one, so
//! that an older token never replaces a newer one; its failure, or its task being dropped,
//! changes nothing, so that it cannot fail the requests the live fetch will serve.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};
use tower::util::rng::{HasherRng, Rng};
use tower::BoxError;

use crate::credentials;
use crate::error::Error;
use crate::future::{Watch, Watching};
use crate::source::{DynSource, FetchFuture, Token};

/// The longest the cache waits for anything: longer durations (a backoff, a fetch timeout)
/// are cut to it, and timers for later instants wake up in steps of it. Tokio's timers
/// cannot take an instant near the end of what `Instant` can hold.
pub(crate) const LONGEST_WAIT: Duration = Duration::from_secs(60 * 60 * 24 * 365);

const FRESH: u64 = 0;
const STALE: u64 = 1;
const UNUSABLE: u64 = 2;

/// Bits of the word: the phase in the lowest 2, then the token's slot in the table of
/// interned values (10 bits, `0` for none), then whether the token expires (1 bit, see
/// [`Cache::deadline`]), then the generation.
const fn word(generation: u64, slot: u16, phase: u64) -> u64 {
    (generation << 13) | ((slot as u64 & 0x3ff) << 2) | phase
}

const EXPIRES: u64 = 1 << 12;

const fn generation(word: u64) -> u64 {
    word >> 13
}

const fn slot(word: u64) -> u16 {
    ((word >> 2) & 0x3ff) as u16
}

const fn phase(word: u64) -> u64 {
    word & 3
}

const fn with_phase(word: u64, phase: u64) -> u64 {
    (word & !3) | phase
}

/// Settings of the cache, set through the builder methods of
/// [`TwnAuthLayer`](crate::TwnAuthLayer).
#[derive(Clone, Debug)]
pub(crate) struct CacheOptions {
    pub(crate) refresh_ahead: Duration,
    pub(crate) expiry_margin: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) backoff_jitter: f64,
    pub(crate) fetch_timeout: Duration,
    pub(crate) reject_statuses: Option<Arc<[StatusCode]>>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            refresh_ahead: Duration::from_secs(60),
            expiry_margin: Duration::from_secs(10),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            backoff_jitter: 0.5,
            fetch_timeout: Duration::from_secs(30),
            reject_statuses: None,
        }
    }
}

/// A token as requests use it: its value, its slot, and the generation it was published
/// under.
#[derive(Clone)]
pub(crate) struct Snapshot {
    pub(crate) generation: u64,
    pub(crate) value: HeaderValue,
    pub(crate) slot: u16,
}

pub(crate) type Outcome = Result<Snapshot, Error>;

/// The cached token and the deadlines derived from it.
struct Entry {
    snapshot: Snapshot,
    /// From here on the word turns `STALE` and a background fetch is due.
    refresh_at: Option<Instant>,
    /// From here on the token counts as expired (its expiry minus the margin).
    usable_until: Option<Instant>,
    /// Set when this token replaced one the server rejected: until then, a rejection of this
    /// token too is taken as the server refusing fresh tokens, not as a rotation.
    hold_until: Option<Instant>,
}

impl Entry {
    fn usable_at(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|until| now < until)
    }

    fn phase_at(&self, now: Instant) -> u64 {
        if !self.usable_at(now) {
            UNUSABLE
        } else if self.refresh_at.is_some_and(|at| now >= at) {
            STALE
        } else {
            FRESH
        }
    }
}

/// Everything behind the lock.
struct Slot {
    current: Option<Entry>,
    last_generation: u64,
    /// Waiters of the fetch under way; `Some` exactly while a fetch task runs.
    flight: Option<Vec<oneshot::Sender<Outcome>>>,
    /// When the fetch under way started.
    flight_started: Option<Instant>,
    /// The number of the latest fetch started; fetches are numbered from 1.
    flight_id: u64,
    /// The number of the fetch whose token was stored last.
    stored_id: u64,
    /// Whether timer tasks watch `current`'s deadlines.
    armed: bool,
    /// Backoff after failed fetches, `Some` from the first failure to the next success.
    failures: Option<Backoff>,
    /// Until when the source is left alone after a failure, and that failure.
    resting: Option<(Instant, Error)>,
    /// Backoff after rejected replacement tokens, `Some` until a token is accepted.
    rejections: Option<Backoff>,
    /// `hold_until` for the token the fetch under way will bring, if a rejection started it.
    next_hold: Option<Instant>,
}

/// What the slow path decided for a request.
pub(crate) enum Acquire {
    Ready(Snapshot),
    Wait(oneshot::Receiver<Outcome>),
    Failed(Error),
}

/// The shared cache. Services hold it through [`CachedToken`].
pub(crate) struct Cache {
    /// The published `(generation, phase)`; on a cache line of its own so that reads from
    /// every core do not contend with reference-count or lock traffic.
    word: Padded<AtomicU64>,
    /// For a word with the `EXPIRES` bit: the microseconds from `base` at which the token
    /// stops being usable, shifted left by 8, with the low 8 bits of its generation below.
    /// Requests compare it with the clock, so that a timer running late can never make them
    /// send a token past its expiry margin.
    deadline: AtomicU64,
    base: Instant,
    /// The highest generation that got a response not counted as a rejection.
    confirmed: AtomicU64,
    /// The highest generation that a rejection found dropped or replaced, or dropped itself:
    /// a request rejected with it has a newer token to try.
    dropped: AtomicU64,
    slot: Mutex<Slot>,
    source: Arc<dyn DynSource>,
    name: Arc<str>,
    options: CacheOptions,
    /// A token read before the cache was made, kept so that a rebuilt cache starts with it.
    initial: Option<Token>,
}

#[repr(align(128))]
struct Padded<T>(T);

impl Cache {
    /// Returns a cache in front of `source`, holding `initial` if given.
    ///
    /// `initial` is a token read before the cache was first used, such as the one
    /// [`TwnAuthLayer::from_env`](crate::TwnAuthLayer::from_env) checks up front.
    pub(crate) fn new(
        source: Arc<dyn DynSource>,
        options: CacheOptions,
        initial: Option<Token>,
    ) -> Self {
        let name = Arc::from(source.source_name());
        let cache = Cache {
            word: Padded(AtomicU64::new(word(0, 0, UNUSABLE))),
            confirmed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            deadline: AtomicU64::new(u64::MAX),
            base: Instant::now(),
            slot: Mutex::new(Slot {
                current: None,
                last_generation: 0,
                flight: None,
                flight_started: None,
                flight_id: 0,
                stored_id: 0,
                armed: false,
                failures: None,
                resting: None,
                rejections: None,
                next_hold: None,
            }),
            source,
            name,
            options,
            initial: initial.clone(),
        };
        if let Some(token) = initial {
            let mut slot = cache.lock();
            slot.last_generation = 1;
            // The word stays `UNUSABLE` until the first request arms the timers on its
            // runtime.
            slot.current = Some(cache.entry(token, 1, Instant::now(), None));
        }
        cache
    }

    pub(crate) fn source(&self) -> Arc<dyn DynSource> {
        Arc::clone(&self.source)
    }

    pub(crate) fn initial(&self) -> Option<Token> {
        self.initial.clone()
    }

    pub(crate) fn options(&self) -> &CacheOptions {
        &self.options
    }

    /// Returns the generation of the published token, or of the last one published.
    pub(crate) fn generation(&self) -> u64 {
        generation(self.word.0.load(Ordering::Acquire))
    }

    /// Whether a rejection found the token of `generation`, or a later one, dropped or
    /// replaced, or dropped it.
    pub(crate) fn dropped_since(&self, generation: u64) -> bool {
        self.dropped.load(Ordering::Acquire) >= generation.max(1)
    }

    /// Returns how long a fetch may take: the option, cut to [`LONGEST_WAIT`].
    pub(crate) fn fetch_timeout(&self) -> Duration {
        self.options.fetch_timeout.min(LONGEST_WAIT)
    }

    /// Whether a response with `status` rejects the token it was sent with.
    pub(crate) fn rejects(&self, status: StatusCode) -> bool {
        self.options
            .reject_statuses
            .as_ref()
            .is_some_and(|statuses| statuses.contains(&status))
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // Every critical section leaves `Slot` consistent before anything that could panic.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slow path: returns a usable token, a fetch to wait for, or why there is neither.
    ///
    /// Who fetches: the first caller that finds no usable token and no fetch under way spawns
    /// the fetch, unless the source is backing off after a failure, in which case the caller
    /// fails at once with the last error. Who waits: every caller that finds no usable token
    /// while a fetch is under way, including the one that spawned it.
    fn acquire(self: &Arc<Self>) -> Acquire {
        let mut slot = self.lock();
        let now = Instant::now();

        if let Some(entry) = &slot.current {
            if entry.usable_at(now) {
                let snapshot = entry.snapshot.clone();
                if !slot.armed {
                    self.arm(&mut slot, now);
                }
                return Acquire::Ready(snapshot);
            }
            slot.current = None;
            self.word
                .0
                .store(word(slot.last_generation, 0, UNUSABLE), Ordering::Release);
        }

        // A fetch past its timeout that has not answered runs on a runtime that no longer
        // makes progress (its own timeout would have fired otherwise): start another here.
        let patience = self.fetch_timeout().saturating_add(Duration::from_secs(1));
        let stuck = slot
            .flight_started
            .is_some_and(|started| now.saturating_duration_since(started) >= patience);
        let mut started = None;
        if slot.flight.is_some() && stuck {
            tracing::debug!(source = %self.name, "token fetch stuck; starting another");
            match self.start_fetch(&mut slot) {
                Ok(fetch) => started = Some(fetch),
                Err(error) => return Acquire::Failed(error),
            }
        }

        if slot.flight.is_none() {
            if let Some((retry_at, error)) = slot.resting.as_ref().filter(|(at, _)| now < *at) {
                let (retry_at, mut error) = (*retry_at, error.clone());
                if let Error::Fetch { retry_in, .. } = &mut error {
                    *retry_in = Some(retry_at - now);
                }
                return Acquire::Failed(error);
            }
            match self.start_fetch(&mut slot) {
                Ok(fetch) => started = Some(fetch),
                Err(error) => return Acquire::Failed(error),
            }
        }

        let (tx, rx) = oneshot::channel();
        if let Some(waiters) = slot.flight.as_mut() {
            waiters.push(tx);
        }
        drop(slot);
        if let Some(fetch) = started {
            fetch.spawn();
        }
        Acquire::Wait(rx)
    }

    /// Starts a background fetch when a request found the word `STALE`.
    ///
    /// Many requests may see the same `STALE` word; the compare-and-swap back to `FRESH`
    /// lets exactly one of them through to the lock.
    fn refresh_stale(self: &Arc<Self>, seen: u64) {
        let fresh = with_phase(seen, FRESH);
        if self
            .word
            .0
            .compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let mut slot = self.lock();
        if let Some((retry_at, _)) = slot.resting.as_ref().filter(|(at, _)| Instant::now() < *at) {
            // The last refresh failed and its backoff has not passed: the word stays `FRESH`
            // until then.
            let retry_at = *retry_at;
            drop(slot);
            self.watch(generation(seen), vec![(retry_at, STALE)]);
            return;
        }
        if slot.flight.is_none() {
            tracing::trace!(source = %self.name, "token inside its refresh-ahead window");
            match self.start_fetch(&mut slot) {
                Ok(fetch) => {
                    drop(slot);
                    fetch.spawn();
                }
                Err(error) => {
                    tracing::debug!(
                        source = %self.name,
                        %error,
                        "cannot start a background refresh"
                    );
                    // Try again on a later request.
                    let _ = self.word.0.compare_exchange(
                        fresh,
                        seen,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
        }
    }

    /// Drops the token of `generation` after the server rejected it, and fetches another.
    ///
    /// Only that token is dropped: a rejection that arrives after the token was replaced
    /// changes nothing, so concurrent rejections of one token cause one fetch. A replacement
    /// token that is itself rejected before it ever worked is kept until its hold time has
    /// passed (the backoff), so a server that refuses every token does not make the cache
    /// fetch for every request.
    pub(crate) fn invalidate(self: &Arc<Self>, rejected: u64) {
        let mut slot = self.lock();
        let now = Instant::now();
        let Some(entry) = slot.current.as_ref() else {
            // Already dropped or expired: the next request waits for the fetch that replaces
            // it.
            self.dropped.fetch_max(rejected, Ordering::AcqRel);
            return;
        };
        if entry.snapshot.generation != rejected {
            // Already replaced, by a rejection of the same token or by the source bringing a
            // newer one: the request can be sent again with that one.
            self.dropped.fetch_max(rejected, Ordering::AcqRel);
            return;
        }

        let worked = self.confirmed.load(Ordering::Acquire) >= rejected;
        let replacement = entry.hold_until.is_some();
        if !worked && entry.hold_until.is_some_and(|until| now < until) {
            tracing::debug!(
                source = %self.name,
                "replacement token rejected too; keeping it until the backoff has passed"
            );
            return;
        }
        if worked || !replacement {
            slot.rejections = None;
        }
        slot.next_hold = Some(next_attempt(&mut slot.rejections, &self.options, now));

        tracing::debug!(
            source = %self.name,
            token.generation = rejected,
            "token rejected by the server, as after a rotation; fetching a new one"
        );
        slot.current = None;
        self.dropped.fetch_max(rejected, Ordering::AcqRel);
        self.word
            .0
            .store(word(rejected, 0, UNUSABLE), Ordering::Release);
        if slot.flight.is_none() && slot.resting.as_ref().is_none_or(|(at, _)| *at <= now) {
            match self.start_fetch(&mut slot) {
                Ok(fetch) => {
                    drop(slot);
                    fetch.spawn();
                }
                Err(error) => tracing::debug!(source = %self.name, %error, "cannot start a fetch"),
            }
        }
    }

    /// Notes that the token of `generation` got a response that was not a rejection.
    pub(crate) fn confirm(&self, generation: u64) {
        // A load first, so that requests write nothing once the generation is confirmed.
        if self.confirmed.load(Ordering::Relaxed) < generation
            && self.confirmed.fetch_max(generation, Ordering::AcqRel) < generation
        {
            let mut slot = self.lock();
            if slot
                .current
                .as_ref()
                .is_some_and(|entry| entry.snapshot.generation == generation)
            {
                slot.rejections = None;
            }
        }
    }

    /// Registers a fetch under way, to be spawned once the caller has released the lock and
    /// registered its own waiter.
    fn start_fetch(self: &Arc<Self>, slot: &mut Slot) -> Result<StartedFetch, Error> {
        let handle = Handle::try_current().map_err(|_| Error::NoRuntime)?;
        // A fetch found stuck keeps its waiters: the new one answers them.
        slot.flight.get_or_insert_with(Vec::new);
        let started = Instant::now();
        slot.flight_started = Some(started);
        slot.flight_id = slot.flight_id.wrapping_add(1);
        let guard = FetchGuard {
            cache: Arc::clone(self),
            id: slot.flight_id,
            started,
            finished: false,
        };
        Ok(StartedFetch { handle, guard })
    }

    /// Publishes the result of fetch `id` and wakes the waiters, if it still counts.
    ///
    /// Fetches are numbered in the order they start, and each stored token remembers its
    /// fetch's number. A token counts unless a later fetch already stored one: should a fetch
    /// thought stuck answer after all, its token serves the waiters sooner, and the token of
    /// the fetch that replaced it, when it comes, is stored too, being newer. A failure
    /// counts only from the latest fetch, while its waiters wait: a stuck fetch that fails,
    /// late, must not fail the requests that a live fetch will serve.
    fn complete(self: &Arc<Self>, id: u64, result: Result<Token, BoxError>, started: Instant) {
        let mut slot = self.lock();
        // Read under the lock, so that no deadline can pass between the reading and the use.
        let now = Instant::now();
        let result = result.and_then(|token| match token.expires_at {
            Some(expires_at) if expires_at <= now => {
                Err("the token source returned a token that had already expired".into())
            }
            _ => Ok(token),
        });
        let counts = match &result {
            Ok(_) => id > slot.stored_id,
            Err(_) => id == slot.flight_id && slot.flight.is_some(),
        };
        if !counts {
            tracing::debug!(
                source = %self.name,
                "token fetch answered after a later one; its result is ignored"
            );
            return;
        }

        let fetch_ms = now.saturating_duration_since(started).as_millis() as u64;
        let waiters = slot.flight.take().unwrap_or_default();
        let hold_until = slot.next_hold.take();
        let outcome = match result {
            Ok(token) => {
                slot.failures = None;
                slot.resting = None;
                slot.stored_id = id;
                slot.last_generation += 1;
                let expires_in_ms = token
                    .expires_at
                    .map(|at| at.saturating_duration_since(now).as_millis() as u64);
                let entry = self.entry(token, slot.last_generation, now, hold_until);
                let snapshot = entry.snapshot.clone();
                if entry.usable_at(now) {
                    tracing::debug!(
                        source = %self.name,
                        fetch_ms,
                        token.generation = snapshot.generation,
                        token.expires_in_ms = expires_in_ms,
                        "token fetched"
                    );
                    slot.current = Some(entry);
                    slot.armed = false;
                    self.arm(&mut slot, now);
                } else {
                    // Cached, it would make every request fetch again at once; the waiters
                    // get it, since it has not expired yet (checked above), and the next
                    // request fetches.
                    tracing::debug!(
                        source = %self.name,
                        fetch_ms,
                        token.expires_in_ms = expires_in_ms,
                        "token fetched already inside its expiry margin; not cached"
                    );
                }
                Ok(snapshot)
            }
            Err(cause) => {
                let retry_at = next_attempt(&mut slot.failures, &self.options, now);
                let retry_in = retry_at.saturating_duration_since(now);
                let error = Error::Fetch {
                    source_name: Arc::clone(&self.name),
                    cause: Arc::from(cause),
                    retry_in: Some(retry_in),
                };
                tracing::debug!(
                    source = %self.name,
                    fetch_ms,
                    %error,
                    backoff_ms = retry_in.as_millis() as u64,
                    "token fetch failed; backing off"
                );
                slot.resting = Some((retry_at, error.clone()));
                match slot.current.as_ref().filter(|entry| entry.usable_at(now)) {
                    Some(entry) => {
                        // Keep sending the token we have; ask the source again once the
                        // backoff has passed. The word goes back from `STALE` to `FRESH`
                        // only: should the expiry timer have made it `UNUSABLE` meanwhile,
                        // that stands.
                        let snapshot = entry.snapshot.clone();
                        let generation = snapshot.generation;
                        self.advance(generation, FRESH);
                        self.watch(generation, vec![(retry_at, STALE)]);
                        Ok(snapshot)
                    }
                    None => Err(error),
                }
            }
        };

        drop(slot);
        for waiter in waiters {
            // A waiter that was dropped no longer needs the result.
            let _ = waiter.send(outcome.clone());
        }
    }

    /// Wakes the waiters of fetch `id`, whose task was dropped before it finished, unless a
    /// later fetch superseded it.
    fn abandon(&self, id: u64) {
        let waiters = {
            let mut slot = self.lock();
            if slot.flight_id != id || slot.flight.is_none() {
                tracing::debug!(source = %self.name, "token fetch dropped after a later one");
                return;
            }
            let now = Instant::now();
            let usable = slot.current.as_ref().filter(|entry| entry.usable_at(now));
            if let Some(generation) = usable.map(|entry| entry.snapshot.generation) {
                // A background refresh gone with its runtime is still due. It starts again
                // after a backoff, as after a failure, so that a runtime made for each request
                // (which drops every refresh it starts) does not call the source for each
                // request; and the next request re-arms the timers on its own runtime.
                let retry_at = next_attempt(&mut slot.failures, &self.options, now);
                let error = Error::FetchAbandoned {
                    source_name: Arc::clone(&self.name),
                };
                slot.resting = Some((retry_at, error));
                slot.armed = false;
                self.word
                    .0
                    .store(word(generation, 0, UNUSABLE), Ordering::Release);
            }
            slot.flight.take().unwrap_or_default()
        };
        tracing::debug!(source = %self.name, "token fetch abandoned");
        for waiter in waiters {
            let _ = waiter.send(Err(Error::FetchAbandoned {
                source_name: Arc::clone(&self.name),
            }));
        }
    }

    /// Derives the deadlines of a token received at `now`.
    fn entry(
        &self,
        token: Token,
        generation: u64,
        now: Instant,
        hold_until: Option<Instant>,
    ) -> Entry {
        let options = &self.options;
        let usable_until = token
            .expires_at
            .map(|at| at.checked_sub(options.expiry_margin).unwrap_or(now));
        let ahead = match (token.expires_at, usable_until) {
            (Some(expires_at), Some(until)) => {
                let window_start = expires_at.checked_sub(options.refresh_ahead).unwrap_or(now);
                // Keep at least half of the usable lifetime free of refreshes, so that a
                // token shorter-lived than the windows does not cause back-to-back fetches.
                let half = now + until.saturating_duration_since(now) / 2;
                Some(window_start.max(half).min(until))
            }
            _ => None,
        };
        let refresh_at = match (ahead, token.refresh_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Entry {
            snapshot: Snapshot {
                generation,
                value: token.value.header_value().clone(),
                slot: token.value.slot(),
            },
            refresh_at,
            usable_until,
            hold_until,
        }
    }

    /// Publishes `current` and starts the timers that move it through its phases.
    fn arm(self: &Arc<Self>, slot: &mut Slot, now: Instant) {
        let Some(entry) = slot.current.as_ref() else {
            return;
        };
        let generation = entry.snapshot.generation;
        let mut phase = entry.phase_at(now);
        let mut refresh_at = entry.refresh_at;
        if phase == STALE && slot.flight.is_some() {
            // The refresh this phase asks for is already under way.
            phase = FRESH;
        }
        if let Some((retry_at, _)) = slot.resting.as_ref().filter(|(at, _)| now < *at) {
            // The last refresh failed: the next one waits for the backoff to pass.
            refresh_at = refresh_at.map(|at| at.max(*retry_at));
            if phase == STALE {
                phase = FRESH;
            }
        }
        let mut steps: Vec<_> = [(refresh_at, STALE), (entry.usable_until, UNUSABLE)]
            .into_iter()
            .filter_map(|(at, phase)| at.filter(|at| *at > now).map(|at| (at, phase)))
            .collect();
        steps.sort_by_key(|(at, _)| *at);
        if Handle::try_current().is_err() {
            // Without timers the word must not claim the token is usable: requests keep
            // taking the slow path, which reads the clock.
            return;
        }
        slot.armed = true;
        let mut published = word(generation, entry.snapshot.slot, phase);
        if let Some(until) = entry.usable_until {
            // Stored before the word, so that a request that sees the word sees its deadline.
            let micros = until.saturating_duration_since(self.base).as_micros();
            let micros = u64::try_from(micros)
                .unwrap_or(u64::MAX >> 8)
                .min(u64::MAX >> 8);
            let deadline = (micros << 8) | (generation & 0xff);
            self.deadline.store(deadline, Ordering::Release);
            published |= EXPIRES;
        }
        self.word.0.store(published, Ordering::Release);
        self.watch(generation, steps);
    }

    /// Whether the token of word `seen` is past its deadline, or the deadline at hand is not
    /// that token's: either way the request must take the slow path.
    #[inline]
    fn past_deadline(&self, seen: u64) -> bool {
        let deadline = self.deadline.load(Ordering::Acquire);
        if deadline & 0xff != generation(seen) & 0xff {
            return true;
        }
        let micros = Instant::now()
            .saturating_duration_since(self.base)
            .as_micros();
        micros >= u128::from(deadline >> 8)
    }

    /// Spawns a task that moves the word of `generation` to each phase at its instant.
    fn watch(self: &Arc<Self>, generation: u64, steps: Vec<(Instant, u64)>) {
        let Ok(handle) = Handle::try_current() else {
            return;
        };
        if steps.is_empty() {
            return;
        }
        let cache = Arc::downgrade(self);
        drop(handle.spawn(async move {
            let mut guard = WatchGuard {
                cache: cache.clone(),
                generation,
                finished: false,
            };
            for (at, phase) in steps {
                while Instant::now() < at {
                    let step = Instant::now().checked_add(LONGEST_WAIT).unwrap_or(at);
                    sleep_until(at.min(step)).await;
                }
                let Some(cache) = cache.upgrade() else {
                    break;
                };
                if !cache.advance(generation, phase) {
                    break;
                }
            }
            guard.finished = true;
        }));
    }

    /// Moves the word of `generation` to `to`; returns `false` once that generation is gone.
    fn advance(&self, generation: u64, to: u64) -> bool {
        let mut seen = self.word.0.load(Ordering::Acquire);
        loop {
            if self::generation(seen) != generation {
                return false;
            }
            // Only forward through the phases, except `STALE` back to `FRESH` once a refresh
            // is taken care of; nothing leaves `UNUSABLE` but a new generation.
            let allowed = match to {
                STALE => phase(seen) == FRESH,
                FRESH => phase(seen) == STALE,
                _ => phase(seen) != UNUSABLE,
            };
            if !allowed {
                return phase(seen) != UNUSABLE;
            }
            match self.word.0.compare_exchange_weak(
                seen,
                with_phase(seen, to),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    tracing::trace!(
                        source = %self.name,
                        token.generation = generation,
                        to,
                        "token phase"
                    );
                    return to != UNUSABLE;
                }
                Err(now_seen) => seen = now_seen,
            }
        }
    }
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("source", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Exponential backoff with jitter: `min` doubled for each failure before this one, capped at
/// `max`, plus a random share (up to the jitter ratio) of that, still capped at `max`.
///
/// tower's `ExponentialBackoff` computes the same base, but its jitter drops the fractional
/// seconds of the random share, so a 1 s or 2 s base gets no jitter at all; and it returns a
/// timer, where the cache needs an instant.
#[derive(Debug)]
struct Backoff {
    failures: u32,
    rng: HasherRng,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            failures: 0,
            rng: HasherRng::default(),
        }
    }

    /// Returns the delay before the next attempt and counts one more failure.
    fn next_delay(&mut self, options: &CacheOptions) -> Duration {
        let max = options.backoff_max;
        let base = options
            .backoff_min
            .checked_mul(2_u32.saturating_pow(self.failures))
            .unwrap_or(max)
            .min(max);
        self.failures = self.failures.saturating_add(1);
        let ratio = if options.backoff_jitter.is_finite() {
            options.backoff_jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let jitter = base.mul_f64(self.rng.next_f64() * ratio);
        base.saturating_add(jitter).min(max)
    }
}

/// Returns when the next attempt may start, counting one more failure in `state`.
///
/// A delay longer than [`LONGEST_WAIT`] is cut to it.
fn next_attempt(state: &mut Option<Backoff>, options: &CacheOptions, now: Instant) -> Instant {
    let delay = state.get_or_insert_with(Backoff::new).next_delay(options);
    now.checked_add(delay.min(LONGEST_WAIT)).unwrap_or(now)
}

/// Runs when the fetch task is dropped, finished or not.
///
/// It is made before the task is spawned and moves into it, so that a task dropped before
/// its first poll (its runtime shutting down) reports too.
struct FetchGuard {
    cache: Arc<Cache>,
    id: u64,
    started: Instant,
    finished: bool,
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.cache.abandon(self.id);
        }
    }
}

/// A fetch registered under the lock, not yet spawned.
#[must_use = "a registered fetch must be spawned, or its waiters wait for nothing"]
struct StartedFetch {
    handle: Handle,
    guard: FetchGuard,
}

impl StartedFetch {
    /// Spawns the fetch task. Call it without the lock held: a runtime that is shutting down
    /// drops the task at once, and its guard then takes the lock to report.
    fn spawn(self) {
        let StartedFetch { handle, guard } = self;
        // The task owns the fetch: no request's cancellation reaches it.
        drop(handle.spawn(fetch(guard)));
    }
}

/// Runs fetch `guard.id` and publishes its result.
async fn fetch(mut guard: FetchGuard) {
    let cache = Arc::clone(&guard.cache);
    tracing::debug!(source = %cache.name, "token fetch started");
    let timeout = cache.fetch_timeout();
    // A source that never answers must not keep every later request waiting: past the
    // timeout, the fetch counts as failed and the backoff applies.
    // The source can panic in `fetch` itself, before it has a future to return, as well as
    // in the future: both are failed fetches.
    let result = match std::panic::catch_unwind(AssertUnwindSafe(|| cache.source.fetch_boxed())) {
        Ok(source) => match tokio::time::timeout(timeout, CatchPanic(source)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no token within {} ms", timeout.as_millis()).into()),
        },
        Err(_) => Err(PANICKED.into()),
    };
    cache.complete(guard.id, result, guard.started);
    guard.finished = true;
}

/// What a fetch whose source panicked fails with.
const PANICKED: &str = "the token source panicked";

/// The source's future, with a panic turned into an error: a source that panics fails like
/// one that returns an error, and is backed off.
struct CatchPanic<'a>(FetchFuture<'a>);

impl Future for CatchPanic<'_> {
    type Output = Result<Token, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fetch = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fetch.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => Poll::Ready(Err(PANICKED.into())),
        }
    }
}

/// Runs when a timer task is dropped, finished or not.
struct WatchGuard {
    cache: Weak<Cache>,
    generation: u64,
    finished: bool,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The runtime went away under the timer: nobody will move the word at the deadlines
        // any more, so send requests to the slow path, which re-arms on their runtime.
        let Some(cache) = self.cache.upgrade() else {
            return;
        };
        let mut slot = cache.lock();
        if slot
            .current
            .as_ref()
            .is_some_and(|entry| entry.snapshot.generation == self.generation)
        {
            slot.armed = false;
            cache
                .word
                .0
                .store(word(self.generation, 0, UNUSABLE), Ordering::Release);
        }
    }
}

/// What a request gets from its service's token; `R` is what its response future keeps to
/// report the answer, and `N` proves that the token is one that can be missing (`()`; a
/// fixed token's is uninhabited, so that it never makes a request wait or fail).
pub(crate) enum Lookup<R = Watching, N = ()> {
    /// Send this token, and watch the response if rotation detection is on.
    Ready(HeaderValue, R),
    /// Wait for the fetch under way; the handle makes the watch once the token is there.
    Wait(oneshot::Receiver<Outcome>, CachedToken, N),
    /// No token can be had now.
    Failed(Error, N),
}

/// A service's handle on the cache of a token-source layer.
///
/// It holds nothing but the shared cache, so cloning a service per request (as `oneshot` on a
/// shared client does) costs a reference count and loses nothing.
pub struct CachedToken {
    cache: Arc<Cache>,
}

impl CachedToken {
    pub(crate) fn new(cache: Arc<Cache>) -> Self {
        CachedToken { cache }
    }

    pub(crate) fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Returns the token for a request, if one can be had without a lock.
    ///
    /// A usable word names its token's slot in the table of interned values, which is read
    /// without a lock: one atomic load for the word, one for the slot, and a clone of a value
    /// whose bytes are `'static`. A `STALE` word starts a background refresh. `None` (a token
    /// without a slot, past the interning budget, or a word that is not usable) leaves the
    /// request to [`lookup`](Self::lookup).
    #[inline]
    pub(crate) fn ready(&mut self) -> Option<(HeaderValue, Watching)> {
        let seen = self.cache.word.0.load(Ordering::Acquire);
        if phase(seen) == UNUSABLE || (seen & EXPIRES != 0 && self.cache.past_deadline(seen)) {
            return None;
        }
        let value = credentials::interned(slot(seen))?;
        if phase(seen) == STALE {
            self.cache.refresh_stale(seen);
        }
        Some((value.clone(), self.watch(generation(seen))))
    }

    /// Returns the token for a request that [`ready`](Self::ready) had none for, through
    /// the cache's lock: a usable token, a fetch to wait for, or why there is neither.
    pub(crate) fn lookup(&mut self) -> Lookup {
        match self.cache.acquire() {
            Acquire::Ready(snapshot) => {
                let seen = self.cache.word.0.load(Ordering::Acquire);
                if phase(seen) == STALE && generation(seen) == snapshot.generation {
                    self.cache.refresh_stale(seen);
                }
                Lookup::Ready(snapshot.value, self.watch(snapshot.generation))
            }
            Acquire::Wait(rx) => Lookup::Wait(rx, self.clone(), ()),
            Acquire::Failed(error) => Lookup::Failed(error, ()),
        }
    }

    /// Returns what the response future needs to report how the server answered the token of
    /// `generation`, if rotation detection is on.
    pub(crate) fn watch(&self, generation: u64) -> Watching {
        if self.cache.options.reject_statuses.is_none() {
            return Watching::default();
        }
        Watching(Some(Watch {
            cache: Arc::clone(&self.cache),
            generation,
            #[cfg(feature = "tower-http")]
            sent_to: None,
        }))
    }

    /// Takes the slow path: a usable token, a fetch to wait for, or why there is neither.
    pub(crate) fn acquire(&self) -> Acquire {
        self.cache.acquire()
    }

    /// Returns how long a fetch may take.
    pub(crate) fn fetch_timeout(&self) -> Duration {
        self.cache.fetch_timeout()
    }

    /// Returns the source's name, for errors.
    pub(crate) fn source_name(&self) -> &Arc<str> {
        &self.cache.name
    }
}

impl Clone for CachedToken {
    fn clone(&self) -> Self {
        CachedToken {
            cache: Arc::clone(&self.cache),
        }
    }
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("source", &self.cache.name)
            .field("options", &self.cache.options)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_stays_under_cap() {
        let options = CacheOptions::default();
        let mut delays = Vec::new();
        for _ in 0..50 {
            let mut backoff = Backoff::new();
            let run: Vec<_> = (0..8).map(|_| backoff.next_delay(&options)).collect();
            for (failures, delay) in run.iter().enumerate() {
                let base = Duration::from_secs(1 << failures.min(5)).min(options.backoff_max);
                assert!(*delay >= base, "{delay:?} < {base:?}");
                assert!(*delay <= (base + base / 2).min(options.backoff_max));
            }
            delays.push(run[0]);
        }
        delays.sort();
        delays.dedup();
        assert!(delays.len() > 10, "no jitter: {delays:?}");
    }
}
