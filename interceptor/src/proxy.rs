//! The userspace data path: pod-local listeners, protocol detection, relaying.
