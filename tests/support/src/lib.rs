//! Test helpers shared by the proxy tests (`interceptor/tests`) and the end-to-end tests
//! (`tests/`), so each exists once: a bytes codec for tonic (gRPC without protoc) and raw
//! HTTP/2 backends on h2 for the shapes a gRPC library would never produce, and a seeded
//! random source.

pub mod codec;
pub mod h2_backend;
pub mod http1_backend;
pub mod rng;
