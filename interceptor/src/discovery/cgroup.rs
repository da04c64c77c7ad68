//! Pod -> cgroup, the way the kubelet lays cgroups out on cgroup v2: the systemd driver
//! (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`) and the
//! cgroupfs driver (`kubepods/burstable/pod<uid>`), Guaranteed pods directly under
//! `kubepods`. Container runtimes add their own scopes below the pod (`cri-containerd-*.scope`,
//! `crio-*.scope`); hooks attach at the pod level, so they cover every container, also one that
//! restarts. Nested kubelets (kind, a custom `--cgroup-root`) are found by a bounded search.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use super::model::{PodUid, QosClass};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem in /proc/mounts: interceptor needs the unified cgroup hierarchy (cgroup v2); pass --cgroup-root if it is mounted where this process cannot see it")]
    NoCgroup2,
    #[error("reading /proc/mounts: {0}")]
    Mounts(#[source] std::io::Error),
    #[error("cgroup root {0} is not a directory: set --cgroup-root to the cgroup2 mount the kubelet uses")]
    BadRoot(PathBuf),
    #[error("no cgroup for pod uid {uid} under {root} (looked for {tried} and searched {depth} levels): the pod may not have started yet, or the kubelet uses a cgroup layout interceptor does not know; check --cgroup-root")]
    NotFound {
        uid: PodUid,
        root: PathBuf,
        tried: String,
        depth: usize,
    },
}

/// The cgroup2 mount point from /proc/mounts (`/sys/fs/cgroup` on a pure v2 node,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mounts").map_err(CgroupError::Mounts)?;
    find_cgroup2(&text).ok_or(CgroupError::NoCgroup2)
}

fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
        // /proc/mounts escapes spaces and friends in octal.
        (fstype == "cgroup2").then(|| PathBuf::from(target.replace("\\040", " ")))
    })
}

/// How deep the fallback search looks below the root.
const SEARCH_DEPTH: usize = 6;

/// Finds pods' cgroups under one cgroup2 root.
#[derive(Debug, Clone)]
pub struct CgroupLayout {
    root: PathBuf,
}

impl CgroupLayout {
    pub fn new(root: PathBuf) -> Result<Self, CgroupError> {
        if !root.is_dir() {
            return Err(CgroupError::BadRoot(root));
        }
        Ok(Self { root })
    }

    /// `--cgroup-root` if given, else the cgroup2 mount.
    pub fn detect(root: Option<PathBuf>) -> Result<Self, CgroupError> {
        Self::new(match root {
            Some(r) => r,
            None => cgroup2_mount()?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The well-known places, the pod's QoS class first.
    fn candidates(&self, uid: &PodUid, qos: Option<QosClass>) -> Vec<PathBuf> {
        let plain = &uid.0;
        let underscored = uid.0.replace('-', "_");
        let mut classes = vec![
            QosClass::Burstable,
            QosClass::BestEffort,
            QosClass::Guaranteed,
        ];
        if let Some(q) = qos {
            classes.retain(|c| *c != q);
            classes.insert(0, q);
        }
        let mut out = Vec::new();
        for class in classes {
            let (systemd, cgroupfs) = match class {
                QosClass::Guaranteed => (
                    format!("kubepods.slice/kubepods-pod{underscored}.slice"),
                    format!("kubepods/pod{plain}"),
                ),
                QosClass::Burstable => (
                    format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice"),
                    format!("kubepods/burstable/pod{plain}"),
                ),
                QosClass::BestEffort => (
                    format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice"),
                    format!("kubepods/besteffort/pod{plain}"),
                ),
            };
            out.push(self.root.join(systemd));
            out.push(self.root.join(cgroupfs));
        }
        out
    }

    /// The pod's cgroup directory.
    pub fn pod_cgroup(&self, uid: &PodUid, qos: Option<QosClass>) -> Result<PathBuf, CgroupError> {
        let candidates = self.candidates(uid, qos);
        if let Some(found) = candidates.iter().find(|p| p.is_dir()) {
            return Ok(found.clone());
        }
        if let Some(found) = self.search(uid) {
            return Ok(found);
        }
        let tried = candidates
            .iter()
            .take(2)
            .map(|p| {
                p.strip_prefix(&self.root)
                    .unwrap_or(p)
                    .display()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join(" or ");
        Err(CgroupError::NotFound {
            uid: uid.clone(),
            root: self.root.clone(),
            tried,
            depth: SEARCH_DEPTH,
        })
    }

    /// Breadth-first search for a directory named after the pod (either driver's spelling).
    fn search(&self, uid: &PodUid) -> Option<PathBuf> {
        let cgroupfs = format!("pod{}", uid.0);
        let systemd = format!("pod{}.slice", uid.0.replace('-', "_"));
        let mut queue = VecDeque::from([(self.root.clone(), 0usize)]);
        while let Some((dir, depth)) = queue.pop_front() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name == cgroupfs.as_str() || name.ends_with(&format!("-{systemd}")) {
                    return Some(entry.path());
                }
                // Containers' own scopes never hold a pod: do not descend into them.
                if depth + 1 < SEARCH_DEPTH && !name.ends_with(".scope") {
                    queue.push_back((entry.path(), depth + 1));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("icp-cg-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Self(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const UID: &str = "5f0c-11aa-22bb";

    #[test]
    fn finds_both_drivers_and_nested_layouts() {
        let uid = PodUid(UID.into());
        for (tag, rel, qos) in [
            (
                "systemd",
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f0c_11aa_22bb.slice",
                Some(QosClass::BestEffort),
            ),
            ("cgroupfs", "kubepods/burstable/pod5f0c-11aa-22bb", None),
            ("guaranteed", "kubepods.slice/kubepods-pod5f0c_11aa_22bb.slice", None),
            (
                "kind",
                "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod5f0c_11aa_22bb.slice",
                None,
            ),
        ] {
            let t = TempDir::new(tag);
            std::fs::create_dir_all(t.0.join(rel).join("cri-containerd-abc.scope"))
                .expect("layout");
            let layout = CgroupLayout::new(t.0.clone()).expect("root");
            assert_eq!(
                layout.pod_cgroup(&uid, qos).expect(tag),
                t.0.join(rel),
                "{tag}"
            );
        }
    }

    #[test]
    fn missing_pod_names_root_and_fix() {
        let t = TempDir::new("missing");
        let layout = CgroupLayout::new(t.0.clone()).expect("root");
        let e = layout
            .pod_cgroup(&PodUid(UID.into()), None)
            .expect_err("no such pod");
        let msg = e.to_string();
        assert!(msg.contains(UID) && msg.contains("--cgroup-root"), "{msg}");
        assert!(CgroupLayout::new(t.0.join("nope")).is_err());
    }

    #[test]
    fn cgroup2_mount_from_proc_mounts() {
        let mounts = "sysfs /sys sysfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            find_cgroup2(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_cgroup2("sysfs /sys sysfs rw 0 0\n"), None);
    }
}
