//! The file source: multi-document YAML of real Kubernetes objects (Namespace, Service,
//! EndpointSlice, Pod, Node; `kind: List` too), from one file or every `*.yaml`/`*.yml` in a
//! directory, reloaded when it changes. A manifest that does not parse is reported in one line
//! naming the document and the object, and the previous objects stay in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::watch;

use super::object_ref;
use super::objects::Objects;

/// How often the manifests are checked for changes: well inside the 1 s the issue allows
/// for a change to take effect, and a `stat` per tick costs nothing.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading manifests {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path} document {doc}: not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        doc: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("manifest {path} document {doc}: {what}")]
    Shape {
        path: PathBuf,
        doc: usize,
        what: String,
    },
    #[error("manifest {path} document {doc} ({kind} {name}): {source}")]
    Object {
        path: PathBuf,
        doc: usize,
        kind: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The manifest files of `path`: itself, or its `*.yaml`/`*.yml` files in name order.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, FileError> {
    let read_err = |source| FileError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads and parses everything under `path`.
pub fn load(path: &Path) -> Result<Objects, FileError> {
    let mut objects = Objects::default();
    for file in manifest_files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|source| FileError::Read {
            path: file.clone(),
            source,
        })?;
        parse_into(&text, &file, &mut objects)?;
    }
    // No EndpointSlice controller writes hints here: write the ones it would.
    objects.derive_hints();
    Ok(objects)
}

/// Parses one multi-document YAML text into `objects`.
pub fn parse_into(text: &str, path: &Path, objects: &mut Objects) -> Result<(), FileError> {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|source| FileError::Yaml {
            path: path.to_path_buf(),
            doc: doc_no,
            source,
        })?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).map_err(|e| FileError::Shape {
            path: path.to_path_buf(),
            doc: doc_no,
            what: format!("cannot be read as a Kubernetes object: {e}"),
        })?;
        add_object(json, path, doc_no, objects)?;
    }
    Ok(())
}

fn add_object(
    json: serde_json::Value,
    path: &Path,
    doc: usize,
    objects: &mut Objects,
) -> Result<(), FileError> {
    let shape = |what: String| FileError::Shape {
        path: path.to_path_buf(),
        doc,
        what,
    };
    let Some(kind) = json
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_string)
    else {
        return Err(shape(
            "has no `kind`: every document must be a Kubernetes object".to_string(),
        ));
    };
    let name = json
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string();
    let namespace = json
        .pointer("/metadata/namespace")
        .and_then(|n| n.as_str())
        .unwrap_or("default")
        .to_string();
    let label = if kind == "Namespace" || kind == "Node" {
        name.clone()
    } else {
        format!("{namespace}/{name}")
    };
    if kind != "List" && name.is_empty() {
        return Err(shape(format!("{kind} has no metadata.name")));
    }
    fn typed<T: DeserializeOwned>(
        json: serde_json::Value,
        path: &Path,
        doc: usize,
        kind: &str,
        name: &str,
    ) -> Result<T, FileError> {
        serde_json::from_value(json).map_err(|source| FileError::Object {
            path: path.to_path_buf(),
            doc,
            kind: kind.to_string(),
            name: name.to_string(),
            source,
        })
    }
    match kind.as_str() {
        "List" => {
            for item in json
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default()
            {
                add_object(item, path, doc, objects)?;
            }
        }
        "Namespace" => {
            let ns: Namespace = typed(json, path, doc, &kind, &label)?;
            objects.namespaces.insert(name, ns);
        }
        "Node" => {
            let node: Node = typed(json, path, doc, &kind, &label)?;
            objects.nodes.insert(name, node);
        }
        "Service" => {
            let mut svc: Service = typed(json, path, doc, &kind, &label)?;
            svc.metadata.namespace = Some(namespace);
            objects.services.insert(object_ref(&svc.metadata), svc);
        }
        "EndpointSlice" => {
            let mut slice: EndpointSlice = typed(json, path, doc, &kind, &label)?;
            slice.metadata.namespace = Some(namespace);
            objects.slices.insert(object_ref(&slice.metadata), slice);
        }
        "Pod" => {
            let mut pod: Pod = typed(json, path, doc, &kind, &label)?;
            pod.metadata.namespace = Some(namespace);
            objects.pods.insert(object_ref(&pod.metadata), pod);
        }
        other => {
            tracing::debug!(path = %path.display(), doc, kind = other, name = %label, "ignoring an object kind discovery does not use");
        }
    }
    Ok(())
}

/// What identifies a version of the manifests without reading them.
fn fingerprint(path: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    manifest_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (f, mtime, len)
        })
        .collect()
}

/// Loads `path` now (an error here is fatal: there is nothing to keep serving yet), then
/// publishes every change until `out` has no receivers. A later error is logged once per
/// broken version and the last good objects stay published.
pub async fn watch_manifests(
    path: PathBuf,
    out: watch::Sender<Arc<Objects>>,
) -> Result<(), FileError> {
    let first = load(&path)?;
    tracing::info!(path = %path.display(), namespaces = first.namespaces.len(), services = first.services.len(), slices = first.slices.len(), pods = first.pods.len(), "manifests loaded");
    out.send_replace(Arc::new(first));
    let mut seen = fingerprint(&path);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if out.is_closed() {
            return Ok(());
        }
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load(&path) {
            Ok(objects) => {
                tracing::info!(path = %path.display(), namespaces = objects.namespaces.len(), services = objects.services.len(), slices = objects.slices.len(), pods = objects.pods.len(), "manifests reloaded");
                out.send_replace(Arc::new(objects));
            }
            Err(e) => {
                tracing::error!(error = %e, "manifests not applied: fix them; the previous state stays in force");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {interceptor.io/enabled: "true"}}
---
apiVersion: v1
kind: Service
metadata: {name: greet, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: grpc, port: 50051}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
---
# a comment-only document is fine
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: greet-1, namespace: shop, labels: {kubernetes.io/service-name: greet}}
  addressType: IPv4
  ports: [{name: grpc, port: 8080}]
  endpoints: [{addresses: [10.0.0.2]}]
"#;

    #[test]
    fn parses_every_kind_it_uses() {
        let mut o = Objects::default();
        parse_into(GOOD, Path::new("m.yaml"), &mut o).expect("parses");
        assert!(o.namespace_enabled("shop"));
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.slices.len(), 1);
        assert_eq!(o.node_zone(Some("node-a")), Some("zone-a"));
        let state = o.desired_state(&Default::default());
        let port = &state.services[&"10.96.0.10:50051".parse().expect("addr")];
        assert_eq!(port.endpoints.len(), 1);
    }

    #[test]
    fn errors_name_the_document_and_object() {
        let bad = "kind: Namespace\nmetadata: {name: a}\n---\nkind: Service\nmetadata: {name: greet, namespace: shop}\nspec: {ports: [{port: nope}]}\n";
        let e = parse_into(bad, Path::new("m.yaml"), &mut Objects::default())
            .expect_err("a port must be a number");
        let msg = e.to_string();
        assert!(
            msg.contains("m.yaml document 2 (Service shop/greet)"),
            "{msg}"
        );

        let e = parse_into("a: [", Path::new("m.yaml"), &mut Objects::default())
            .expect_err("broken YAML");
        assert!(e.to_string().contains("document 1: not valid YAML"), "{e}");

        let e = parse_into(
            "metadata: {name: x}",
            Path::new("m.yaml"),
            &mut Objects::default(),
        )
        .expect_err("no kind");
        assert!(e.to_string().contains("has no `kind`"), "{e}");
    }
}
