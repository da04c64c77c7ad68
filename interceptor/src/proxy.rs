//! The userspace data path: pod-local listeners, protocol detection, relaying.

pub mod balancer;
pub mod body;
pub mod config;
pub mod connector;
pub mod demux;
pub mod detect;
pub mod endpoints;
pub mod grpc;
pub mod limit;
pub mod metrics;
pub mod opaque;
pub mod passthrough;
pub mod pod_listener;
pub mod pool;
pub mod server;
pub mod standalone;
pub mod stream;
pub mod workers;
