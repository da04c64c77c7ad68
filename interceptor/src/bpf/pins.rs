//! Where pins live on bpffs, mounting bpffs when missing, and refusing to trust a reused pin
//! whose layout differs from what this build expects.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use interceptor_common::{
    names, ListenerKey, OrigDst, ServiceKey, ServiceValue, ABI_VERSION, LISTENERS_MAX,
    REDIRECT_SLOTS, SERVICES_MAX, STAT_COUNT, V6_DST_MAX,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNTPOINT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "map {name} pinned at {path} has {what} {found}, expected {expected}: it was left by an \
         incompatible build. Remove the stale pin (`interceptor uninstall`, or `rm {path}`), or \
         start with --replace-stale-pins"
    )]
    Stale {
        name: &'static str,
        path: PathBuf,
        what: &'static str,
        found: String,
        expected: String,
    },
    #[error("cannot read pinned map {name} at {path}: {source}. Remove it (`rm {path}`) if it is not a BPF map")]
    Unreadable {
        name: &'static str,
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error(
        "pin root {path} is not on a bpffs and bpffs could not be mounted at {BPFFS_MOUNTPOINT}: \
         {source}. Mount it with `mount -t bpf bpffs {BPFFS_MOUNTPOINT}` (in a pod: a hostPath \
         volume for /sys/fs/bpf)"
    )]
    NoBpffs { path: PathBuf, source: io::Error },
    #[error("pin root {path} is not on a bpffs: choose a directory under {BPFFS_MOUNTPOINT}")]
    NotBpffs { path: PathBuf },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl PinError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PinError {
        let path = path.to_path_buf();
        move |source| PinError::Io {
            action,
            path,
            source,
        }
    }
}

/// The directory tree of one ABI version's pins:
/// `<root>/v<ABI>/<map>` and `<root>/v<ABI>/links/<cgroup id>/<program>`.
#[derive(Clone, Debug)]
pub struct PinLayout {
    dir: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        Self {
            dir: root.join(format!("v{ABI_VERSION}")),
        }
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }
}

/// The layout this build creates for each pinned map.
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

const fn spec(
    name: &'static str,
    map_type: MapType,
    key: usize,
    value: usize,
    max: u32,
) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries: max,
    }
}

const MAP_SPECS: [MapSpec; 5] = [
    spec(
        names::MAP_SERVICES,
        MapType::Hash,
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
        SERVICES_MAX,
    ),
    spec(
        names::MAP_REDIRECTS,
        MapType::Array,
        size_of::<u32>(),
        size_of::<OrigDst>(),
        REDIRECT_SLOTS,
    ),
    spec(
        names::MAP_V6_DST,
        MapType::LruHash,
        size_of::<u64>(),
        size_of::<OrigDst>(),
        V6_DST_MAX,
    ),
    spec(
        names::MAP_LISTENERS,
        MapType::SockHash,
        size_of::<ListenerKey>(),
        // The socket's fd on insert, its cookie when read back (8 bytes makes reads possible).
        size_of::<u64>(),
        LISTENERS_MAX,
    ),
    spec(
        names::MAP_STATS,
        MapType::PerCpuArray,
        size_of::<u32>(),
        size_of::<u64>(),
        STAT_COUNT,
    ),
];

/// Makes sure `root` is on a bpffs, mounting one at /sys/fs/bpf when nothing is mounted there
/// (as on a fresh machine; a DaemonSet normally gets the host's through a hostPath volume).
pub(crate) fn ensure_bpffs(root: &Path) -> Result<(), PinError> {
    if on_bpffs(root) {
        return Ok(());
    }
    if !root.starts_with(BPFFS_MOUNTPOINT) {
        return Err(PinError::NotBpffs {
            path: root.to_path_buf(),
        });
    }
    let mountpoint = std::ffi::CString::new(BPFFS_MOUNTPOINT).expect("no NUL in a const path");
    // SAFETY: all pointers are valid NUL-terminated strings or null (no mount data).
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            mountpoint.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PinError::NoBpffs {
            path: root.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    tracing::info!(mountpoint = BPFFS_MOUNTPOINT, "mounted bpffs");
    Ok(())
}

/// Whether the nearest existing ancestor of `path` is on a bpffs.
fn on_bpffs(path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid path, st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    st.f_type as i64 == BPF_FS_MAGIC
}

/// Creates the pin directories and checks every map pin that already exists.
pub(crate) fn prepare(layout: &PinLayout, replace_stale: bool) -> Result<(), PinError> {
    std::fs::create_dir_all(layout.links_dir())
        .map_err(PinError::io("creating", &layout.links_dir()))?;
    for spec in &MAP_SPECS {
        let path = layout.map(spec.name);
        if !path.exists() {
            continue;
        }
        match validate(spec, &path) {
            Ok(()) => tracing::info!(map = spec.name, path = %path.display(), "reusing pinned map"),
            Err(err) if replace_stale => {
                tracing::warn!(error = %err, "replacing stale pin");
                std::fs::remove_file(&path).map_err(PinError::io("removing", &path))?;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn validate(spec: &MapSpec, path: &Path) -> Result<(), PinError> {
    let info = MapInfo::from_pin(path).map_err(|source| PinError::Unreadable {
        name: spec.name,
        path: path.to_path_buf(),
        source,
    })?;
    let stale = |what: &'static str, found: String, expected: String| PinError::Stale {
        name: spec.name,
        path: path.to_path_buf(),
        what,
        found,
        expected,
    };
    let map_type = info.map_type().map_err(|source| PinError::Unreadable {
        name: spec.name,
        path: path.to_path_buf(),
        source,
    })?;
    if map_type != spec.map_type {
        return Err(stale(
            "type",
            format!("{map_type:?}"),
            format!("{:?}", spec.map_type),
        ));
    }
    let checks = [
        ("key size", info.key_size(), spec.key_size),
        ("value size", info.value_size(), spec.value_size),
        ("max entries", info.max_entries(), spec.max_entries),
    ];
    for (what, found, expected) in checks {
        if found != expected {
            return Err(stale(what, found.to_string(), expected.to_string()));
        }
    }
    Ok(())
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Removes every pin under `root` (all ABI versions): unpinning the links detaches the hooks
/// from every pod, so new connects go straight to kube-proxy again.
pub fn uninstall(root: &Path) -> Result<Removed, PinError> {
    let mut removed = Removed::default();
    if !root.exists() {
        return Ok(removed);
    }
    for version in version_dirs(root)? {
        remove_version(&version, &mut removed)?;
    }
    std::fs::remove_dir(root).map_err(PinError::io("removing", root))?;
    Ok(removed)
}

/// Removes the pins of every ABI version but this build's. An earlier version's hooks left on a
/// pod's cgroup would redirect into this agent's listener in a way it cannot resolve, so they
/// go before any listener opens (after an upgrade the old agent is gone; its hooks are not).
pub(crate) fn remove_other_versions(layout: &PinLayout) -> Result<Removed, PinError> {
    let mut removed = Removed::default();
    let Some(root) = layout.dir().parent() else {
        return Ok(removed);
    };
    if !root.exists() {
        return Ok(removed);
    }
    for version in version_dirs(root)? {
        let is_version = version
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_version && version != layout.dir() {
            remove_version(&version, &mut removed)?;
            tracing::warn!(pins = %version.display(), "removed the pins and hooks of another interceptor version");
        }
    }
    Ok(removed)
}

fn version_dirs(root: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).map_err(PinError::io("reading", root))? {
        let path = entry.map_err(PinError::io("reading", root))?.path();
        if path.is_dir() {
            out.push(path);
        }
    }
    Ok(out)
}

fn remove_version(version: &Path, removed: &mut Removed) -> Result<(), PinError> {
    let links = version.join("links");
    if links.is_dir() {
        for cgroup in std::fs::read_dir(&links).map_err(PinError::io("reading", &links))? {
            let cgroup = cgroup.map_err(PinError::io("reading", &links))?.path();
            for link in std::fs::read_dir(&cgroup).map_err(PinError::io("reading", &cgroup))? {
                let link = link.map_err(PinError::io("reading", &cgroup))?.path();
                std::fs::remove_file(&link).map_err(PinError::io("removing", &link))?;
                removed.links += 1;
            }
            std::fs::remove_dir(&cgroup).map_err(PinError::io("removing", &cgroup))?;
        }
        std::fs::remove_dir(&links).map_err(PinError::io("removing", &links))?;
    }
    for entry in std::fs::read_dir(version).map_err(PinError::io("reading", version))? {
        let path = entry.map_err(PinError::io("reading", version))?.path();
        std::fs::remove_file(&path).map_err(PinError::io("removing", &path))?;
        removed.maps += 1;
    }
    std::fs::remove_dir(version).map_err(PinError::io("removing", version))
}
