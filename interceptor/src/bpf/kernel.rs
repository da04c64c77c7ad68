//! What the datapath needs from the kernel, checked before anything is loaded or pinned, so a
//! node that lacks a feature gets one error naming it (and the kernel option that provides it)
//! instead of a verifier log or an attach failure halfway through.
//!
//! Linux 5.14 is the oldest kernel with everything below (SO_NETNS_COOKIE came last); the
//! project is developed and tested on 6.18. Features are probed rather than inferred from the
//! version, so a distribution kernel with backports passes on what it has.

use std::ffi::CStr;

use aya::maps::MapType;
use aya::programs::ProgramType;

/// The oldest kernel release that has every feature the datapath uses.
pub const MINIMUM_KERNEL: &str = "5.14";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("the kernel refused to load a probe program ({0}): the agent needs CAP_BPF and CAP_SYS_ADMIN (CAP_SYS_ADMIN alone on kernels before 5.8); run it privileged, as deploy/ does, or as root")]
    NotPermitted(String),
    #[error("kernel {release} lacks {feature} ({config}); interceptor needs Linux {MINIMUM_KERNEL} or later with it")]
    Missing {
        release: String,
        feature: &'static str,
        config: &'static str,
    },
    #[error("probing the kernel for {feature} failed: {detail}")]
    Probe {
        feature: &'static str,
        detail: String,
    },
}

/// What `check` found, for the start-up log line.
#[derive(Debug, Clone)]
pub struct KernelReport {
    pub release: String,
}

/// Checks every kernel feature the datapath uses; the first one missing is the error.
pub fn check() -> Result<KernelReport, KernelError> {
    let release = release();
    let missing = |feature, config| KernelError::Missing {
        release: release.clone(),
        feature,
        config,
    };
    match aya::sys::is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(true) => {}
        Ok(false) => {
            return Err(missing(
                "cgroup socket-address programs (connect4/connect6, getpeername4/6)",
                "CONFIG_CGROUP_BPF",
            ))
        }
        Err(e) if is_permission(&e) => return Err(KernelError::NotPermitted(detail(&e))),
        Err(e) => {
            return Err(KernelError::Probe {
                feature: "cgroup socket-address programs",
                detail: detail(&e),
            })
        }
    }
    for (map, feature, config) in [
        (
            MapType::SockHash,
            "socket hash maps (icp_listeners)",
            "CONFIG_BPF_STREAM_PARSER",
        ),
        (
            MapType::LruHash,
            "LRU hash maps (icp_v6_dst)",
            "CONFIG_BPF_SYSCALL",
        ),
        (
            MapType::PerCpuArray,
            "per-CPU array maps (icp_stats)",
            "CONFIG_BPF_SYSCALL",
        ),
    ] {
        match aya::sys::is_map_supported(map) {
            Ok(true) => {}
            Ok(false) => return Err(missing(feature, config)),
            Err(e) => {
                return Err(KernelError::Probe {
                    feature,
                    detail: e.to_string(),
                })
            }
        }
    }
    let features = aya::features();
    if features.btf().is_none() {
        return Err(missing(
            "BTF for loaded programs and maps (bpftool shows map fields through it)",
            "CONFIG_DEBUG_INFO_BTF",
        ));
    }
    if !features.bpf_global_data() {
        return Err(missing(
            "global data in BPF programs (the listener port is a load-time constant)",
            "Linux 5.2",
        ));
    }
    if !has_netns_cookie_sockopt() {
        return Err(missing(
            "the SO_NETNS_COOKIE socket option (the agent keys pod listeners by netns cookie)",
            "Linux 5.14",
        ));
    }
    Ok(KernelReport { release })
}

/// The failed call and the OS error (aya's own message names only the call).
fn detail(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::SyscallError(s) => format!("{}: {}", s.call, s.io_error),
        other => other.to_string(),
    }
}

fn is_permission(e: &aya::programs::ProgramError) -> bool {
    match e {
        aya::programs::ProgramError::SyscallError(s) => {
            matches!(s.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        }
        _ => false,
    }
}

/// `uname -r`.
pub fn release() -> String {
    // SAFETY: utsname is plain data; uname fills it and NUL-terminates every field.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: `release` is NUL-terminated by uname.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether getsockopt knows SO_NETNS_COOKIE (Linux 5.14).
fn has_netns_cookie_sockopt() -> bool {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket syscalls on a descriptor we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            // No socket to ask: let the real use report it.
            return true;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        r == 0 || err.raw_os_error() != Some(libc::ENOPROTOOPT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_reports_a_release_and_has_the_netns_cookie_option() {
        let r = release();
        assert!(r.chars().next().is_some_and(|c| c.is_ascii_digit()), "{r}");
        // The machines this project runs on are newer than the minimum.
        assert!(
            has_netns_cookie_sockopt(),
            "kernel {r} lacks SO_NETNS_COOKIE"
        );
    }

    #[test]
    fn a_missing_feature_names_the_kernel_the_feature_and_the_option() {
        let e = KernelError::Missing {
            release: "5.4.0".into(),
            feature: "socket hash maps (icp_listeners)",
            config: "CONFIG_BPF_STREAM_PARSER",
        };
        let msg = e.to_string();
        for part in [
            "5.4.0",
            "socket hash maps",
            "CONFIG_BPF_STREAM_PARSER",
            MINIMUM_KERNEL,
        ] {
            assert!(msg.contains(part), "{msg}");
        }
    }
}
