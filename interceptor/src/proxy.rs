//! The userspace data path: pod-local listeners, protocol detection, relaying.

pub mod passthrough;
pub mod pod_listener;
