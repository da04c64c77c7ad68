//! Network namespaces of pods: the agent opens each pod's listener and its upstream sockets
//! inside the pod's netns, so redirected traffic never leaves the pod and backends see the
//! pod's own IP.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// An open handle on a network namespace (it stays valid while the pod's processes change).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
            path: path.to_path_buf(),
        })
    }

    /// The netns of a process, e.g. one of the pod's containers.
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        Self::open(&PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// The netns of the first process found in a cgroup or below it: under cgroup v2 a
    /// pod's processes live in its containers' child cgroups (the sandbox and the app
    /// containers), which all share the pod's netns.
    pub fn of_cgroup(cgroup: &Path) -> io::Result<Self> {
        let mut last_err = io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no process in {} or below it: the pod has no running container yet",
                cgroup.display()
            ),
        );
        // Breadth-first, bounded: pod cgroups are shallow (pod / container).
        let mut queue = std::collections::VecDeque::from([(cgroup.to_path_buf(), 0u32)]);
        while let Some((dir, depth)) = queue.pop_front() {
            let procs = dir.join("cgroup.procs");
            let text = match std::fs::read_to_string(&procs) {
                Ok(t) => t,
                Err(e) if depth == 0 => return Err(e),
                Err(_) => continue,
            };
            for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                match Self::of_pid(pid) {
                    Ok(ns) => return Ok(ns),
                    Err(e) => last_err = e,
                }
            }
            if depth < 4 {
                if let Ok(children) = std::fs::read_dir(&dir) {
                    for child in children.flatten() {
                        if child.file_type().is_ok_and(|t| t.is_dir()) {
                            queue.push_back((child.path(), depth + 1));
                        }
                    }
                }
            }
        }
        Err(last_err)
    }

    /// Identity of the namespace (device and inode of its nsfs file): a pod whose sandbox
    /// was recreated has a new one.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this netns, then moves the thread back.
    /// `f` must not block on other tasks: sockets it creates stay in this netns for good.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(&self.file)?;
        let out = f();
        if let Err(e) = setns(&home) {
            // A worker thread stuck in a pod's netns would open sockets in the wrong place.
            eprintln!("interceptor: cannot return a thread to its own network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: a valid fd and a namespace type flag.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_NETNS_COOKIE` of a socket: the cookie of the netns it lives in.
pub fn netns_cookie(sock: &impl AsFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
