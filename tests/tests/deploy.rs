//! deploy/ checked offline, without a cluster or root: every manifest the kustomization lists
//! validates (strict) against the Kubernetes API schemas bundled in the Python package
//! kubernetes-validate (installed by `cargo xtask setup`), the RBAC grant is exactly what the
//! agent's kube source reads, and the DaemonSet's configuration and probes agree with the
//! agent's admin endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use interceptor::discovery::kube::REQUIRED_ACCESS;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, Probe, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The oldest Kubernetes release the manifests must be valid for (k8s-openapi's `v1_33`).
const KUBERNETES_VERSION: &str = "1.33";
/// The agent's admin endpoint, as the DaemonSet configures it and probes it.
const ADMIN_ADDR: &str = "127.0.0.1:9901";
const ADMIN_PORT: i32 = 9901;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .join("deploy")
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The non-empty YAML documents of a deploy/ file.
fn documents(name: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(&read(name))
        .map(|doc| {
            serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("deploy/{name} is not valid YAML: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The one object of `kind` in a deploy/ file, as its Kubernetes API type.
fn object<T: DeserializeOwned>(name: &str, kind: &str) -> T {
    let mut found: Vec<serde_yaml::Value> = documents(name)
        .into_iter()
        .filter(|doc| doc.get("kind").and_then(|k| k.as_str()) == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "deploy/{name} must hold exactly one {kind}");
    serde_yaml::from_value(found.remove(0))
        .unwrap_or_else(|e| panic!("the {kind} in deploy/{name} does not parse: {e}"))
}

#[derive(Deserialize)]
struct Kustomization {
    namespace: String,
    resources: Vec<String>,
}

fn kustomization() -> Kustomization {
    serde_yaml::from_str(&read("kustomization.yaml")).expect("deploy/kustomization.yaml parses")
}

fn daemonset() -> DaemonSet {
    object("daemonset.yaml", "DaemonSet")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec");
    assert_eq!(pod.containers.len(), 1, "the agent pod has one container");
    &pod.containers[0]
}

/// `python3 -m kubernetes_validate --strict` on one file: unknown fields are errors too.
fn kubernetes_validate(file: &Path) -> Output {
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
        ])
        .arg(KUBERNETES_VERSION)
        .arg(file)
        .output()
        .expect("running python3 (the deploy/ tests need it: run `cargo xtask setup`)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "the Python package kubernetes-validate is missing: run `cargo xtask setup`\n{stderr}"
    );
    out
}

fn shown(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A file under the temp dir, removed when dropped (also when the test panics).
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "icp-deploy-{}-{}-{name}",
            std::process::id(),
            interceptor_tests::unique_id()
        ));
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn every_kustomization_resource_exists_and_validates_strictly() {
    let kustomization = kustomization();
    assert!(
        !kustomization.resources.is_empty(),
        "deploy/kustomization.yaml lists no resources"
    );
    for name in &kustomization.resources {
        let path = deploy_dir().join(name);
        assert!(
            path.is_file(),
            "deploy/kustomization.yaml lists {name}, which does not exist"
        );
        let out = kubernetes_validate(&path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !stdout.contains("ERROR"),
            "deploy/{name} does not validate against Kubernetes {KUBERNETES_VERSION}:\n{}",
            shown(&out)
        );
        assert_eq!(
            stdout.matches(" passed for resource ").count(),
            documents(name).len(),
            "every document of deploy/{name} is validated:\n{}",
            shown(&out)
        );
    }
}

#[test]
fn every_manifest_in_deploy_is_listed_in_the_kustomization() {
    let listed: BTreeSet<String> = kustomization().resources.into_iter().collect();
    let dir = deploy_dir();
    for entry in std::fs::read_dir(&dir).expect("reading deploy/") {
        let name = entry
            .expect("reading deploy/")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                listed.contains(&name),
                "deploy/{name} is not in deploy/kustomization.yaml's resources, so `kubectl apply -k` skips it"
            );
        }
    }
}

/// The validation can fail: the shipped DaemonSet, broken in one place, is rejected, and the
/// tool's message names the broken field.
#[test]
fn a_broken_manifest_is_rejected() {
    let good: serde_yaml::Value =
        serde_yaml::from_str(&read("daemonset.yaml")).expect("deploy/daemonset.yaml parses");

    // A port that is not a number.
    let mut wrong_type = good.clone();
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"] =
        serde_yaml::from_str(r#"[{containerPort: "x"}]"#).expect("YAML literal");

    // A misspelt field: only strict mode rejects unknown fields.
    let mut unknown_field = good.clone();
    unknown_field["spec"]["template"]["spec"]["hostNetwrok"] = true.into();

    for (what, broken, named) in [
        ("a string containerPort", wrong_type, "containerPort"),
        ("an unknown pod spec field", unknown_field, "hostNetwrok"),
    ] {
        let yaml = serde_yaml::to_string(&broken).expect("serialize the broken DaemonSet");
        let file = TempFile::new("daemonset.yaml", &yaml);
        let out = kubernetes_validate(&file.0);
        assert!(
            !out.status.success(),
            "a DaemonSet with {what} passed validation:\n{}",
            shown(&out)
        );
        assert!(
            shown(&out).contains(named),
            "the rejection of {what} does not name {named}:\n{}",
            shown(&out)
        );
    }
}

#[test]
fn cluster_role_grants_exactly_the_required_access() {
    let role: ClusterRole = object("rbac.yaml", "ClusterRole");
    assert!(
        role.aggregation_rule.is_none(),
        "an aggregated ClusterRole gets rules from elsewhere"
    );
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "rule {rule:?}: the agent needs neither resourceNames nor nonResourceURLs"
        );
        let groups = rule.api_groups.unwrap_or_default();
        let resources = rule.resources.unwrap_or_default();
        assert!(
            !groups.is_empty() && !resources.is_empty() && !rule.verbs.is_empty(),
            "rule with an empty apiGroups, resources or verbs list"
        );
        for name in groups.iter().chain(&resources).chain(&rule.verbs) {
            assert!(!name.contains('*'), "wildcard {name:?} in the ClusterRole");
        }
        for group in &groups {
            for resource in &resources {
                let verbs: BTreeSet<String> = rule.verbs.iter().cloned().collect();
                let previous = granted.insert((group.clone(), resource.clone()), verbs);
                assert!(
                    previous.is_none(),
                    "{group:?}/{resource} is granted by more than one rule"
                );
            }
        }
    }
    let required: BTreeMap<(String, String), BTreeSet<String>> = REQUIRED_ACCESS
        .iter()
        .map(|access| {
            (
                (access.api_group.to_string(), access.resource.to_string()),
                access.verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        granted, required,
        "deploy/rbac.yaml must grant exactly interceptor::discovery::kube::REQUIRED_ACCESS"
    );
}

#[test]
fn binding_gives_the_role_to_the_daemonsets_service_account() {
    let role: ClusterRole = object("rbac.yaml", "ClusterRole");
    let binding: ClusterRoleBinding = object("rbac.yaml", "ClusterRoleBinding");
    let ds = daemonset();
    let namespace = ds
        .metadata
        .namespace
        .clone()
        .expect("the DaemonSet names its namespace");
    let account = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.service_account_name.clone())
        .expect("the DaemonSet names its serviceAccountName");

    assert_eq!(
        binding.role_ref,
        RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role
                .metadata
                .name
                .clone()
                .expect("the ClusterRole has a name"),
        }
    );
    assert_eq!(
        binding.subjects.unwrap_or_default(),
        vec![Subject {
            api_group: None,
            kind: "ServiceAccount".into(),
            name: account.clone(),
            namespace: Some(namespace.clone()),
        }],
        "the binding has one subject: the DaemonSet's ServiceAccount"
    );

    // That ServiceAccount and namespace are the ones deploy/ creates.
    let sa: ServiceAccount = object("serviceaccount.yaml", "ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some(account.as_str()));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(namespace.as_str()));
    let ns: Namespace = object("namespace.yaml", "Namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some(namespace.as_str()));
    assert_eq!(
        kustomization().namespace,
        namespace,
        "the kustomization's namespace"
    );
}

#[test]
fn daemonset_configures_the_agent_by_interceptor_env_vars_only() {
    let ds = daemonset();
    let env = agent_container(&ds).env.clone().unwrap_or_default();
    assert!(!env.is_empty(), "the agent container sets no env vars");
    let mut seen = BTreeSet::new();
    for var in &env {
        assert!(
            var.name.starts_with("INTERCEPTOR_"),
            "env var {} is not one of the agent's INTERCEPTOR_* settings",
            var.name
        );
        assert!(seen.insert(&var.name), "env var {} set twice", var.name);
    }
    let admin = env
        .iter()
        .find(|v| v.name == "INTERCEPTOR_ADMIN_ADDR")
        .and_then(|v| v.value.as_deref());
    assert_eq!(
        admin,
        Some(ADMIN_ADDR),
        "the probes expect the admin endpoint at {ADMIN_ADDR}"
    );
}

#[test]
fn every_daemonset_env_var_is_a_setting_of_interceptor_run() {
    let help = std::process::Command::new(interceptor_tests::target_bin("interceptor"))
        .args(["run", "--help"])
        .output()
        .expect("run `interceptor run --help`");
    let help = String::from_utf8_lossy(&help.stdout);
    let ds = daemonset();
    for var in agent_container(&ds).env.clone().unwrap_or_default() {
        assert!(
            help.contains(&format!("[env: {}=", var.name)),
            "the DaemonSet sets {} but `interceptor run` has no such setting:\n{help}",
            var.name
        );
    }
}

#[test]
fn daemonset_probes_target_the_admin_endpoint() {
    let ds = daemonset();
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec");
    assert_eq!(
        pod.host_network,
        Some(true),
        "the probes reach 127.0.0.1 only in the node's network namespace"
    );
    let container = agent_container(&ds);
    let check = |probe: Option<&Probe>, which: &str, path: &str| {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("the agent has no httpGet {which} probe"));
        assert_eq!(get.port, IntOrString::Int(ADMIN_PORT), "{which} probe port");
        assert_eq!(get.path.as_deref(), Some(path), "{which} probe path");
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"), "{which} probe host");
    };
    check(container.liveness_probe.as_ref(), "liveness", "/healthz");
    check(container.readiness_probe.as_ref(), "readiness", "/readyz");
}

#[derive(Deserialize)]
struct MonitoringKustomization {
    resources: Vec<String>,
    patches: Vec<BTreeMap<String, String>>,
}

#[test]
fn the_monitoring_overlay_fits_the_daemonset_and_the_agent_accepts_it() {
    use clap::Parser;
    let k: MonitoringKustomization =
        serde_yaml::from_str(&read("monitoring/kustomization.yaml")).expect("parses");
    for r in &k.resources {
        assert!(
            deploy_dir().join("monitoring").join(r).exists(),
            "deploy/monitoring/kustomization.yaml lists {r}, which does not exist"
        );
    }
    assert!(
        k.resources.iter().any(|r| r.trim_end_matches('/') == ".."),
        "builds on deploy/"
    );
    let patch_path = k.patches[0].get("path").expect("a patch path");
    let patch: DaemonSet = object(&format!("monitoring/{patch_path}"), "DaemonSet");
    let ds = daemonset();
    assert_eq!(
        patch.metadata.name, ds.metadata.name,
        "the patch targets the agent's DaemonSet"
    );
    let c = agent_container(&patch);
    assert_eq!(
        c.name,
        agent_container(&ds).name,
        "the patch targets the agent's container"
    );
    let addr = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "INTERCEPTOR_METRICS_ADDR")
        .and_then(|e| e.value.clone())
        .expect("the patch sets INTERCEPTOR_METRICS_ADDR");
    // The agent parses it, and the DaemonSet gives it the node IP it needs.
    let cli = interceptor::cli::Cli::try_parse_from([
        "interceptor",
        "run",
        "--source=static",
        "--metrics-addr",
        &addr,
    ])
    .unwrap_or_else(|e| panic!("the agent rejects INTERCEPTOR_METRICS_ADDR={addr}: {e}"));
    let interceptor::cli::Command::Run(run) = cli.command else {
        panic!("parsed as run")
    };
    let node_ip_from_downward_api = agent_container(&ds)
        .env
        .iter()
        .flatten()
        .any(|e| e.name == "INTERCEPTOR_NODE_IP" && e.value_from.is_some());
    assert!(
        node_ip_from_downward_api,
        "daemonset.yaml sets INTERCEPTOR_NODE_IP"
    );
    let bound = run
        .metrics_addr
        .expect("metrics addr")
        .resolve(Some("10.0.0.7".parse().expect("ip")))
        .expect("resolves with a node IP");
    // With hostNetwork a container port is a host port, which would keep the upgrade's
    // surge pod off the node: the listener must not be declared as one.
    assert!(
        c.ports.as_ref().is_none_or(|p| p.is_empty())
            && agent_container(&ds)
                .ports
                .as_ref()
                .is_none_or(|p| p.is_empty()),
        "no container ports on a hostNetwork DaemonSet with maxSurge"
    );
    let pm = &documents("monitoring/podmonitor.yaml")[0];
    assert_eq!(pm["kind"], "PodMonitor");
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["targetPort"].as_u64(),
        Some(u64::from(bound.port())),
        "the PodMonitor scrapes the port the agent binds"
    );
    let labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    for (k, v) in pm["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels")
    {
        let (k, v) = (k.as_str().expect("key"), v.as_str().expect("value"));
        assert_eq!(
            labels.get(k).map(String::as_str),
            Some(v),
            "PodMonitor selects the agent's pods"
        );
    }

    // The HPA half of the autoscaling example is a core object: it validates strictly.
    let hpa = documents("monitoring/autoscaling-keda.yaml")
        .into_iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler")
        .expect("an HPA example");
    let file = TempFile::new("hpa.yaml", &serde_yaml::to_string(&hpa).expect("yaml"));
    let out = kubernetes_validate(&file.0);
    assert!(
        out.status.success(),
        "the HPA example does not validate:\n{}",
        shown(&out)
    );
    // The dashboard is JSON with queries on metrics the agent exports.
    let dash: serde_json::Value =
        serde_json::from_str(&read("monitoring/grafana-dashboard.json")).expect("dashboard JSON");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    for name in [
        interceptor::proxy::metrics::REQUESTS,
        interceptor::proxy::metrics::ACTIVE_STREAMS,
        interceptor::proxy::metrics::OPAQUE_BYTES,
        interceptor::proxy::metrics::UPSTREAM_GOAWAYS,
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(name)),
            "no panel queries {name}"
        );
    }
}

#[test]
fn the_daemonset_upgrades_new_agent_first_through_the_handoff_socket() {
    let ds = daemonset();
    let spec = ds.spec.as_ref().expect("spec");
    let ru = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update");
    assert_eq!(
        ru.max_surge,
        Some(IntOrString::Int(1)),
        "the new agent starts beside the old"
    );
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
    let c = agent_container(&ds);
    let env = |name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("daemonset.yaml sets {name}"))
    };
    let socket = PathBuf::from(env("INTERCEPTOR_HANDOFF_SOCKET"));
    let dir = socket.parent().expect("the socket's folder");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == dir)
        .unwrap_or_else(|| panic!("{} is mounted", dir.display()));
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    let host = vol
        .host_path
        .as_ref()
        .expect("a hostPath, shared by both agents of a node");
    assert_eq!(Path::new(&host.path), dir);
    // The grace period covers the longer drain after a handover.
    let drain = interceptor::duration::parse(&env("INTERCEPTOR_HANDOFF_DRAIN_TIMEOUT"))
        .expect("a duration");
    let grace = pod
        .termination_grace_period_seconds
        .expect("a grace period");
    assert!(
        grace as u64 > drain.as_secs(),
        "grace {grace} s < handoff drain {drain:?}"
    );
}
