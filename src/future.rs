//! The response future of [`TwnAuth`](crate::TwnAuth), and the wait for a token it may
//! start with.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tower::BoxError;
use tower_service::Service;

use crate::cache::{Acquire, Cache, CachedToken, Outcome};
use crate::credentials::{StaticToken, TWN_AUTHENTICATION};
use crate::error::{Error, Refusal};
use crate::provider::sealed::Provide;
use crate::provider::TokenProvider;

pin_project! {
    /// Response future of [`TwnAuth`](crate::TwnAuth).
    ///
    /// Resolves to the inner service's response, to its error boxed, or to an [`Error`]
    /// when the request could not be authenticated, in which case the inner service was not
    /// called. Polled again after returning that error, it returns a plain boxed error
    /// saying so, rather than panicking.
    ///
    /// `W` is the wait for a token that a request to a token-source layer may start with:
    /// [`TokenWait`]. `P` is where the layer's token comes from, as in
    /// [`TwnAuth`](crate::TwnAuth): a future of a layer with a token source is a
    /// `ResponseFuture<F, W, CachedToken>`.
    pub struct ResponseFuture<F, W, P: TokenProvider = StaticToken> {
        #[pin]
        state: State<F, W, <P as Provide>::Waits>,
        // How to report the server's answer to the cache, when rotation detection is on;
        // nothing for a fixed token.
        report: <P as Provide>::Report,
    }
}

pin_project! {
    // Laid out for the request that went straight to the inner service, as nearly all do:
    // its future, or the stage of a request that has not reached the inner service.
    #[project = StateProj]
    enum State<F, W, N> {
        Called {
            #[pin]
            future: F,
        },
        NotCalled {
            stage: Stage<W, N>,
        },
    }
}

/// A request that has not reached the inner service: refused from its URI, with nothing to
/// drop, or on a pointer to what remains (`N` is [`Provide::Waits`]: for a fixed token it is
/// uninhabited and `Before` cannot exist).
///
/// The two sit in an enum of their own rather than beside `Called`: this way, for a fixed
/// token, the compiler drops a future with no branch for the `Before` that cannot exist,
/// and dropping a called request's future costs what dropping the inner future costs.
enum Stage<W, N> {
    Refused(Refusal),
    Before(Aside<W>, N),
}

/// A [`Before`] kept on the heap, out of the called future's way, and dropped by a call out
/// of line. Empty only once dropped.
struct Aside<W>(Option<Box<Before<W>>>);

impl<W> Aside<W> {
    fn new(before: Before<W>) -> Self {
        Aside(Some(Box::new(before)))
    }
}

impl<W> Drop for Aside<W> {
    #[inline]
    fn drop(&mut self) {
        drop_cold(self.0.take());
    }
}

/// Drops `value` if there is one, by a call out of line: for the parts of a future that
/// are empty by the time nearly every future is dropped.
#[inline]
fn drop_cold<T>(value: Option<T>) {
    #[cold]
    #[inline(never)]
    fn drop_out_of_line<T>(value: T) {
        drop(value);
    }
    if let Some(value) = value {
        drop_out_of_line(value);
    }
}

/// What remains of a request that waits for a token, or found none.
enum Before<W> {
    /// Waiting for a token.
    Waiting(W),
    /// No token could be had: the error, until it is returned.
    Failed(Option<Error>),
}

impl<F, W, P: TokenProvider> ResponseFuture<F, W, P> {
    pub(crate) fn called(future: F, report: P::Report) -> Self {
        ResponseFuture {
            state: State::Called { future },
            report,
        }
    }

    pub(crate) fn refused(refusal: Refusal) -> Self {
        ResponseFuture {
            state: State::NotCalled {
                stage: Stage::Refused(refusal),
            },
            report: Default::default(),
        }
    }

    pub(crate) fn failed(error: Error, waits: P::Waits) -> Self {
        ResponseFuture {
            state: State::NotCalled {
                stage: Stage::Before(Aside::new(Before::Failed(Some(error))), waits),
            },
            report: Default::default(),
        }
    }

    pub(crate) fn waiting(wait: W, waits: P::Waits) -> Self {
        ResponseFuture {
            state: State::NotCalled {
                stage: Stage::Before(Aside::new(Before::Waiting(wait)), waits),
            },
            report: Default::default(),
        }
    }
}

impl<F, W, P, B, E> Future for ResponseFuture<F, W, P>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    W: sealed::Wait<F>,
    P: TokenProvider,
{
    type Output = Result<Response<B>, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Only the first arm returns a response, and what is out of line gets values or a
        // pointer into the heap, never the future's address: after a called request's
        // answer the compiler knows the future's state. For a fixed token, whose futures
        // cannot wait, it then drops the future with no check and without copying the
        // response aside; a cached token's future keeps a drop of its own, a call out of
        // line.
        loop {
            let mut this = self.as_mut().project();
            let before = match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    return match future.poll(cx) {
                        Poll::Ready(Ok(response)) => {
                            sealed::Report::report(this.report, &response);
                            Poll::Ready(Ok(response))
                        }
                        Poll::Ready(Err(error)) => Poll::Ready(Err(error.into())),
                        Poll::Pending => Poll::Pending,
                    };
                }
                StateProj::NotCalled {
                    stage: Stage::Refused(refusal),
                } => {
                    let refusal = std::mem::replace(refusal, Refusal::Returned);
                    return Poll::Ready(Err(once(refusal.into_error())));
                }
                // For a fixed token, whose requests never wait, this cannot happen.
                StateProj::NotCalled {
                    stage: Stage::Before(before, _),
                } => before.0.as_deref_mut(),
            };
            let (future, watch) = match ready!(poll_before_call(before, cx)) {
                Ok(called) => called,
                Err(error) => return Poll::Ready(Err(error)),
            };
            // The wait handed its request and inner service over: drop what is left.
            this.state.set(State::Called { future });
            *this.report = sealed::Report::from_watch(watch);
        }
    }
}

/// Advances a request that waits for a token or found none, until the wait has called the
/// inner service; `None` is a request whose error was returned already.
#[cold]
#[inline(never)]
fn poll_before_call<W, F>(
    before: Option<&mut Before<W>>,
    cx: &mut Context<'_>,
) -> Poll<Result<(F, Watching), BoxError>>
where
    W: sealed::Wait<F>,
{
    let Some(stage) = before else {
        return Poll::Ready(Err(COMPLETED.into()));
    };
    match stage {
        Before::Waiting(wait) => match ready!(wait.poll_call(cx)) {
            Ok(called) => Poll::Ready(Ok(called)),
            Err(error) => {
                *stage = Before::Failed(None);
                Poll::Ready(Err(error.into()))
            }
        },
        Before::Failed(error) => Poll::Ready(Err(once(error.take()))),
    }
}

/// Returns the error of a request that did not reach the inner service the first time it
/// is asked for (`Some`), and after that says that it was returned already.
#[cold]
#[inline(never)]
fn once(error: Option<Error>) -> BoxError {
    match error {
        Some(error) => error.into(),
        None => COMPLETED.into(),
    }
}

/// What a finished future returns when polled again.
const COMPLETED: &str = "response future polled after completion";

impl<F, W, P: TokenProvider> fmt::Debug for ResponseFuture<F, W, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::NotCalled {
                stage: Stage::Refused(_),
            } => "refused",
            State::NotCalled {
                stage: Stage::Before(before, _),
            } => match before.0.as_deref() {
                Some(Before::Waiting(_)) => "waiting for a token",
                Some(Before::Failed(_)) | None => "refused",
            },
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// The first stage of a [`ResponseFuture`] whose request found no usable token: it waits
/// for the fetch under way, then calls the inner service with the token it brought.
///
/// The inner service it calls is the instance that `poll_ready` readied; the service left a
/// clone in its place. Dropping the future drops the wait, not the fetch.
pub struct TokenWait<S, B> {
    rx: oneshot::Receiver<Outcome>,
    /// When to give up waiting: a little after the fetch's own timeout, in case the fetch
    /// runs on a runtime that no longer makes progress. `None` outside a runtime.
    give_up: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the wait already started over once after giving up.
    restarted: bool,
    inner: Option<S>,
    /// The request, its instance key already set.
    request: Option<Request<B>>,
    token: CachedToken,
}

impl<S, B> TokenWait<S, B> {
    pub(crate) fn new(
        rx: oneshot::Receiver<Outcome>,
        inner: S,
        request: Request<B>,
        token: CachedToken,
    ) -> Self {
        TokenWait {
            rx,
            give_up: give_up_after(token.fetch_timeout()),
            restarted: false,
            inner: Some(inner),
            request: Some(request),
            token,
        }
    }
}

/// Returns a timer for a second past `fetch_timeout`, or `None` outside a runtime.
fn give_up_after(fetch_timeout: Duration) -> Option<Pin<Box<tokio::time::Sleep>>> {
    let patience = fetch_timeout.saturating_add(Duration::from_secs(1));
    tokio::runtime::Handle::try_current()
        .ok()
        .and_then(|_| tokio::time::Instant::now().checked_add(patience))
        .map(|at| Box::pin(tokio::time::sleep_until(at)))
}

impl<S, B> fmt::Debug for TokenWait<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenWait")
            .field("source", self.token.source_name())
            .finish_non_exhaustive()
    }
}

pub(crate) use self::sealed::{Watch, Watching};

pub(crate) mod sealed {
    use super::*;

    /// What a response future needs to report how the server answered a token.
    #[derive(Debug)]
    pub(crate) struct Watch {
        pub(crate) cache: Arc<Cache>,
        pub(crate) generation: u64,
        /// The URI the token was sent to, to tell a redirect's answer from another origin.
        #[cfg(feature = "tower-http")]
        pub(crate) sent_to: Option<http::Uri>,
    }

    impl Watch {
        /// Notes the URI the token goes to.
        #[cfg(feature = "tower-http")]
        pub(crate) fn sent_to(mut self, uri: &http::Uri) -> Self {
            self.sent_to = Some(uri.clone());
            self
        }

        /// Notes the URI the token goes to; only redirects need it.
        #[cfg(not(feature = "tower-http"))]
        pub(crate) fn sent_to(self, _uri: &http::Uri) -> Self {
            self
        }

        /// Drops the token if the response rejected it, or notes that it worked.
        pub(super) fn report<B>(self, response: &Response<B>) {
            #[cfg(feature = "tower-http")]
            {
                // Behind a redirect-following layer, the answer may come from another origin,
                // which never saw the token: it says nothing about the token.
                use tower_http::follow_redirect::RequestUri;
                let answered = response.extensions().get::<RequestUri>();
                if let (Some(RequestUri(answered)), Some(sent_to)) = (answered, &self.sent_to) {
                    if !crate::redirect::same_origin(answered, sent_to) {
                        return;
                    }
                }
            }
            if self.cache.rejects(response.status()) {
                self.cache.invalidate(self.generation);
            } else {
                self.cache.confirm(self.generation);
            }
        }
    }

    /// What a response future keeps to report how the server answered its token: `()` for a
    /// fixed token, which has no one to tell, and a [`Watching`] for a cached one.
    ///
    /// Keeping nothing for a fixed token lets its futures compile down to the inner
    /// service's future and a check that the request was called.
    pub trait Report: Default {
        /// Notes the URI the token goes to.
        fn sent_to(self, uri: &http::Uri) -> Self;

        /// Tells the cache what `response` says of the token, at most once.
        fn report<B>(&mut self, response: &Response<B>);

        /// Takes the watch of a request that waited for a token. Only a cached token makes
        /// requests wait, so `()` never receives one.
        fn from_watch(watch: Watching) -> Self;
    }

    impl Report for () {
        #[inline]
        fn sent_to(self, _uri: &http::Uri) -> Self {}

        #[inline]
        fn report<B>(&mut self, _response: &Response<B>) {}

        fn from_watch(_watch: Watching) -> Self {}
    }

    /// What a cached token's response future keeps to report its answer: a [`Watch`] when
    /// rotation detection is on. Its drop is a check inline and the rest out of line, so
    /// that dropping a future whose answer was reported, as nearly all are, costs a branch.
    #[derive(Debug, Default)]
    pub struct Watching(pub(crate) Option<Watch>);

    impl Drop for Watching {
        #[inline]
        fn drop(&mut self) {
            drop_cold(self.0.take());
        }
    }

    impl Report for Watching {
        #[inline]
        fn sent_to(mut self, uri: &http::Uri) -> Self {
            Watching(self.0.take().map(|watch| watch.sent_to(uri)))
        }

        #[inline]
        fn report<B>(&mut self, response: &Response<B>) {
            if let Some(watch) = self.0.take() {
                watch.report(response);
            }
        }

        fn from_watch(watch: Watching) -> Self {
            watch
        }
    }

    /// A first stage that produces the inner service's future.
    pub trait Wait<F> {
        fn poll_call(&mut self, cx: &mut Context<'_>) -> Poll<Result<(F, Watching), Error>>;
    }
}

impl<S, B> sealed::Wait<S::Future> for TokenWait<S, B>
where
    S: Service<Request<B>>,
{
    fn poll_call(&mut self, cx: &mut Context<'_>) -> Poll<Result<(S::Future, Watching), Error>> {
        let abandoned = |token: &CachedToken| Error::FetchAbandoned {
            source_name: Arc::clone(token.source_name()),
        };
        let outcome = loop {
            match Pin::new(&mut self.rx).poll(cx) {
                Poll::Ready(Ok(outcome)) => break outcome,
                // The fetch task dropped its waiters without a word, which it never does on
                // purpose; treat it as abandoned.
                Poll::Ready(Err(_)) => break Err(abandoned(&self.token)),
                Poll::Pending => {}
            }
            let gave_up = self
                .give_up
                .as_mut()
                .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
            if !gave_up {
                return Poll::Pending;
            }
            if std::mem::replace(&mut self.restarted, true) {
                break Err(abandoned(&self.token));
            }
            // The fetch has not answered past its own timeout, so the runtime it runs on no
            // longer makes progress: ask the cache again, which starts another fetch here.
            match self.token.acquire() {
                Acquire::Ready(snapshot) => break Ok(snapshot),
                Acquire::Failed(error) => break Err(error),
                Acquire::Wait(rx) => {
                    self.rx = rx;
                    self.give_up = give_up_after(self.token.fetch_timeout());
                }
            }
        };
        let snapshot = outcome?;
        let (Some(mut inner), Some(mut request)) = (self.inner.take(), self.request.take()) else {
            return Poll::Ready(Err(Error::FetchAbandoned {
                source_name: Arc::clone(self.token.source_name()),
            }));
        };

        request
            .headers_mut()
            .insert(TWN_AUTHENTICATION, snapshot.value);
        let watch = self.token.watch(snapshot.generation);
        let watch = sealed::Report::sent_to(watch, request.uri());
        Poll::Ready(Ok((inner.call(request), watch)))
    }
}
