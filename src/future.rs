//! The response future of [`TwnAuth`](crate::TwnAuth).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tower::BoxError;

use crate::error::Error;
use crate::provider::Watch;

pin_project! {
    /// Response future of [`TwnAuth`](crate::TwnAuth).
    ///
    /// Resolves to the inner service's response, or to its error boxed, or to an
    /// [`Error`] when the request could not be authenticated and the inner service was not
    /// called.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            future: F,
            watch: Option<Watch>,
        },
        Refused {
            error: Option<Error>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(future: F, watch: Option<Watch>) -> Self {
        ResponseFuture {
            state: State::Called { future, watch },
        }
    }

    pub(crate) fn refused(error: Error) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { future, watch } => {
                let response = ready!(future.poll(cx)).map_err(Into::into)?;
                if let Some(watch) = watch.take() {
                    if watch.statuses.contains(&response.status()) {
                        watch.cache.invalidate(watch.generation);
                    } else {
                        watch.cache.confirm(watch.generation);
                    }
                }
                Poll::Ready(Ok(response))
            }
            StateProj::Refused { error } => Poll::Ready(Err(match error.take() {
                Some(error) => error.into(),
                None => Error::NotReady.into(),
            })),
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
