//! Opaque relay of an accepted connection to its original destination, opened from the pod's
//! netns (kube-proxy then routes it as it would have routed the app's own connect).

use super::pod_listener::{connect_from_pod, Accepted};

pub async fn relay(conn: Accepted) {
    let Accepted {
        mut stream,
        peer,
        orig_dst,
        pod,
    } = conn;
    let mut upstream = match connect_from_pod(&pod.netns, orig_dst).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(pod = %pod.name, %peer, %orig_dst, error = %e, "upstream connect failed");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
        Ok((up, down)) => {
            tracing::debug!(pod = %pod.name, %peer, %orig_dst, up, down, "relay done")
        }
        Err(e) => tracing::debug!(pod = %pod.name, %peer, %orig_dst, error = %e, "relay ended"),
    }
}
