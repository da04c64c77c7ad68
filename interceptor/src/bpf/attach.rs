//! Per-pod attachment: the hooks are attached to each enabled pod's cgroup, and the links are
//! pinned so interception outlives an agent restart (the hook fails open while no listener
//! exists). `bpftool cgroup tree` therefore lists exactly the intercepted pods.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::Ebpf;
use interceptor_common::names;

use super::pins::PinLayout;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cgroup {path}: {source} (is it a cgroup v2 directory?)")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("attaching {program} to cgroup {path} failed: {source}")]
    Attach {
        program: &'static str,
        path: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("pinning the {program} link at {path} failed: {source}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("taking the {program} link as a pinnable link failed: {source}")]
    Link {
        program: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("program {0} is not loaded")]
    NotLoaded(&'static str),
}

impl AttachError {
    pub(crate) fn from_io(path: &Path) -> impl FnOnce(io::Error) -> AttachError {
        let path = path.to_path_buf();
        move |source| AttachError::Cgroup { path, source }
    }
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> AttachError {
        let path = path.to_path_buf();
        move |source| AttachError::Io {
            action,
            path,
            source,
        }
    }
}

/// A cgroup v2 id: the inode number of its directory, as `bpftool cgroup tree` and
/// `bpf_get_current_cgroup_id` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CgroupId(pub u64);

impl CgroupId {
    pub fn of(cgroup: &Path) -> io::Result<Self> {
        Ok(Self(std::fs::metadata(cgroup)?.ino()))
    }
}

impl std::fmt::Display for CgroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The pinned links of one pod cgroup, one per program.
pub struct PodLinks {
    dir: PathBuf,
    links: Vec<(PathBuf, PinnedLink)>,
}

const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_GETPEER4,
    names::PROG_GETPEER6,
];

impl PodLinks {
    pub fn attach(
        ebpf: &mut Ebpf,
        layout: &PinLayout,
        cgroup: &Path,
        id: CgroupId,
    ) -> Result<Self, AttachError> {
        let cgroup_fd = File::open(cgroup).map_err(AttachError::from_io(cgroup))?;
        let dir = layout.links_dir().join(id.to_string());
        std::fs::create_dir_all(&dir).map_err(AttachError::io("creating", &dir))?;
        let mut pod = PodLinks {
            dir,
            links: Vec::new(),
        };
        // On failure `pod` drops its links unpinned: a half-attached pod is never left behind.
        let result = (|| {
            for program in SOCK_ADDR_PROGRAMS {
                let prog: &mut CgroupSockAddr = ebpf
                    .program_mut(program)
                    .and_then(|p| p.try_into().ok())
                    .ok_or(AttachError::NotLoaded(program))?;
                let attach_err = |source| AttachError::Attach {
                    program,
                    path: cgroup.to_path_buf(),
                    source,
                };
                // Link-based cgroup attachments always allow other programs (a CNI's) beside
                // ours; the kernel refuses any attach flag on them, hence `Single` (flags 0).
                let id = prog
                    .attach(&cgroup_fd, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                let link = FdLink::try_from(link)
                    .map_err(|source| AttachError::Link { program, source })?;
                pod.replace_pin(program, link)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                tracing::info!(cgroup = %cgroup.display(), cgroup_id = id.0, "hooks attached");
                Ok(pod)
            }
            Err(err) => {
                let _ = pod.detach();
                Err(err)
            }
        }
    }

    /// Pins `link` at this pod's path for `program`. A previous agent's link pinned there stays
    /// attached until the new one is in place, so the pod is never left without its hook.
    fn replace_pin(&mut self, program: &'static str, link: FdLink) -> Result<(), AttachError> {
        let path = self.dir.join(program);
        let previous = if path.exists() {
            let old = PinnedLink::from_pin(&path).ok();
            std::fs::remove_file(&path).map_err(AttachError::io("removing", &path))?;
            old
        } else {
            None
        };
        let pinned = link.pin(&path).map_err(|source| AttachError::Pin {
            program,
            path: path.clone(),
            source,
        })?;
        self.links.push((path, pinned));
        drop(previous); // closes the last reference to the old link: it detaches now.
        Ok(())
    }

    /// Unpins and detaches every link, and removes the pod's pin directory.
    pub fn detach(self) -> Result<(), AttachError> {
        for (path, link) in self.links {
            // Dropping the unpinned FdLink closes its last fd: the kernel detaches it.
            drop(link.unpin().map_err(AttachError::io("unpinning", &path))?);
        }
        remove_dir_pins(&self.dir)
    }
}

fn remove_dir_pins(dir: &Path) -> Result<(), AttachError> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(AttachError::io("reading", dir))? {
        let path = entry.map_err(AttachError::io("reading", dir))?.path();
        std::fs::remove_file(&path).map_err(AttachError::io("removing", &path))?;
    }
    std::fs::remove_dir(dir).map_err(AttachError::io("removing", dir))
}

/// Cgroup ids that have pinned links.
pub fn pinned_cgroups(layout: &PinLayout) -> Result<Vec<CgroupId>, AttachError> {
    let dir = layout.links_dir();
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(AttachError::io("reading", &dir))? {
        let entry = entry.map_err(AttachError::io("reading", &dir))?;
        if let Some(id) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            ids.push(CgroupId(id));
        }
    }
    ids.sort();
    Ok(ids)
}

/// Removes the pinned links of every cgroup not in `keep`, detaching their hooks.
pub fn prune(layout: &PinLayout, keep: &BTreeSet<CgroupId>) -> Result<Vec<CgroupId>, AttachError> {
    let mut pruned = Vec::new();
    for id in pinned_cgroups(layout)? {
        if !keep.contains(&id) {
            remove_dir_pins(&layout.links_dir().join(id.to_string()))?;
            tracing::info!(cgroup_id = id.0, "removed stale hook pins");
            pruned.push(id);
        }
    }
    Ok(pruned)
}
