//! interceptor: per-request HTTP/2 load balancing for Kubernetes pods, without app changes.
//!
//! Layers: `bpf` (the only user of aya), `proxy` (the only user of h2), `netns` (entering pod
//! network namespaces), `sockdiag` (finding a socket's cookie); `app` wires them.

pub mod admin;
pub mod app;
pub mod bpf;
pub mod cli;
pub mod discovery;
pub mod duration;
pub mod netns;
pub mod proxy;
pub mod sockdiag;
pub mod state;
pub mod telemetry;
