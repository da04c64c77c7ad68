//! The queue through which one connection's task hands work to another's.
//!
//! A connection task owns its socket and codec; what other tasks want sent on it (frames of
//! the streams they relay, window credit) goes through its outbox. The owner takes the whole
//! queue at once, once per turn of its loop, so a burst of frames from one read costs one
//! lock and one wake-up, not one per frame.

use std::sync::Mutex;
use std::task::{Context, Waker};

use super::super::lock;

pub(crate) struct Outbox<M, S = ()> {
    inner: Mutex<Inner<M, S>>,
}

struct Inner<M, S> {
    items: Vec<M>,
    waker: Option<Waker>,
    closed: bool,
    /// State that must change together with the queue (an upstream connection's next
    /// stream id: ids go on the wire in the order they are queued).
    state: S,
}

impl<M, S> Outbox<M, S> {
    pub(crate) fn new(state: S) -> Self {
        Self {
            inner: Mutex::new(Inner {
                items: Vec::new(),
                waker: None,
                closed: false,
                state,
            }),
        }
    }

    /// Queues `m` for the owner; hands it back if the owner is gone.
    pub(crate) fn push(&self, m: M) -> Result<(), M> {
        let waker = {
            let mut g = lock(&self.inner);
            if g.closed {
                return Err(m);
            }
            g.items.push(m);
            g.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Runs `f` on the shared state and `v` and, if it makes a message of them, queues it,
    /// all under one lock. `v` comes back if the owner is gone (`f` is not run) or `f` gave
    /// it back.
    pub(crate) fn push_with<V, R>(
        &self,
        v: V,
        f: impl FnOnce(&mut S, V) -> Result<(M, R), V>,
    ) -> Result<R, V> {
        let (r, waker) = {
            let mut g = lock(&self.inner);
            if g.closed {
                return Err(v);
            }
            let (m, r) = f(&mut g.state, v)?;
            g.items.push(m);
            (r, g.waker.take())
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(r)
    }

    /// Moves everything queued into `into` (which must be empty; its allocation is kept for
    /// the next turn), or, with nothing queued, arranges for the owner to be woken by the
    /// next push.
    pub(crate) fn take(&self, into: &mut Vec<M>, cx: &mut Context<'_>) {
        debug_assert!(into.is_empty());
        let mut g = lock(&self.inner);
        if g.items.is_empty() {
            match &g.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => g.waker = Some(cx.waker().clone()),
            }
            return;
        }
        std::mem::swap(&mut g.items, into);
    }

    /// The owner is gone: later pushes fail. Returns what was queued and not taken.
    pub(crate) fn close(&self) -> Vec<M> {
        let mut g = lock(&self.inner);
        g.closed = true;
        g.waker = None;
        std::mem::take(&mut g.items)
    }
}
