//! What an HTTP/1.1 request sends upstream: the client's body as it arrives, counted so that
//! the wait for the response can tell a slow upload from an endpoint that stopped answering,
//! or nothing (a request rebuilt for a retry carries no body: only bodiless ones are retried).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub type UpstreamBody = Either<Counted, Empty<Bytes>>;

/// The client's request body, bumping `activity` on every frame that moves.
pub struct Counted {
    inner: Incoming,
    activity: Arc<AtomicU64>,
}

impl Counted {
    pub fn new(inner: Incoming, activity: Arc<AtomicU64>) -> Self {
        Self { inner, activity }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
