//! The kernel half, seen from the agent: load the embedded eBPF object, keep its maps pinned
//! across restarts, attach the hooks per pod cgroup, and read and write the maps.
//!
//! This is the only module that uses aya.

mod attach;
pub mod kernel;
mod maps;
mod pins;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aya::programs::CgroupSockAddr;
use aya::{Ebpf, EbpfLoader};
use interceptor_common::{names, Stat, ABI_VERSION};

pub use attach::CgroupId;
pub use maps::{OrigDstTable, ServiceAction};
pub use pins::{uninstall, PinLayout};

/// The eBPF object built by build.rs from `interceptor-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

/// Default bpffs directory for our pins; the ABI version is appended below it.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/interceptor";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error("this agent was built without its eBPF object (the build could not compile interceptor-ebpf: nightly toolchain with rust-src, or bpf-linker 0.13.0, missing). Run `cargo xtask setup`, then rebuild; the build's warnings say what failed")]
    NotBuilt,
    #[error("{0}")]
    Pin(#[from] pins::PinError),
    #[error("loading the eBPF object failed: {0} (needs CAP_BPF and CAP_SYS_ADMIN, and a kernel with BTF and cgroup BPF)")]
    Load(aya::EbpfError),
    #[error("program {name} is missing from the eBPF object: the agent and its object were built from different sources")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("duplicating the handle of map {name} failed: {source}")]
    MapHandle {
        name: &'static str,
        source: std::io::Error,
    },
    #[error(
        "all {} redirect slots are in use: too many intercepted Service ports",
        interceptor_common::REDIRECT_SLOTS
    )]
    SlotsExhausted,
    #[error("loading program {name} into the kernel failed: {detail}")]
    ProgramLoad { name: &'static str, detail: String },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{0}")]
    Attach(#[from] attach::AttachError),
}

/// Load-time settings of the data path.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// bpffs directory for pins (the ABI version directory goes below it).
    pub pin_root: PathBuf,
    /// Port of the pod-local listener the hook redirects to.
    pub listen_port: u16,
    /// Emit aya-log debug records from the kernel programs (off by default: they cost per connect).
    pub kernel_debug_log: bool,
    /// Replace a pinned map whose layout does not match, instead of refusing to start.
    pub replace_stale_pins: bool,
}

/// The loaded programs and maps; enabling a pod attaches the programs to its cgroup.
pub struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    maps: maps::Maps,
    attached: BTreeMap<CgroupId, attach::PodLinks>,
    // Kept alive so the AYA_LOGS ring buffer stays open; drained by `drain_kernel_log`.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Datapath {
    /// Loads the embedded object, reusing pinned maps after checking their layout.
    pub fn load(config: &DatapathConfig) -> Result<Self, BpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        let kernel = kernel::check()?;
        tracing::info!(kernel = %kernel.release, minimum = kernel::MINIMUM_KERNEL, "kernel has every feature the datapath needs");
        let layout = PinLayout::new(&config.pin_root);
        pins::ensure_bpffs(&config.pin_root)?;
        pins::remove_other_versions(&layout)?;
        pins::prepare(&layout, config.replace_stale_pins)?;

        let map_paths: Vec<(&'static str, PathBuf)> = names::MAPS
            .iter()
            .map(|name| (*name, layout.map(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let log_level: u8 = if config.kernel_debug_log {
            4 /* Debug */
        } else {
            0 /* off */
        };
        loader
            .override_global(names::GLOBAL_LISTEN_PORT, &config.listen_port, true)
            .override_global("AYA_LOG_LEVEL", &log_level, false);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(BpfError::Load)?;

        // The logger takes the log ring buffer out of `ebpf`; it must live as long as the programs.
        let logger = if config.kernel_debug_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel debug log unavailable");
                    None
                }
            }
        } else {
            None
        };

        for name in [
            names::PROG_CONNECT4,
            names::PROG_CONNECT6,
            names::PROG_GETPEER4,
            names::PROG_GETPEER6,
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| program_load_error(name, &e))?;
        }

        let maps = maps::Maps::take(&mut ebpf)?;
        tracing::info!(
            pins = %layout.dir().display(),
            abi = ABI_VERSION,
            listen_port = config.listen_port,
            "eBPF programs loaded"
        );
        Ok(Self {
            ebpf,
            layout,
            maps,
            attached: BTreeMap::new(),
            logger,
        })
    }

    /// Attaches the hooks to a pod's cgroup (and pins the links, replacing a previous agent's).
    /// Idempotent.
    pub fn enable_pod(&mut self, cgroup: &Path) -> Result<CgroupId, BpfError> {
        let id = CgroupId::of(cgroup).map_err(attach::AttachError::from_io(cgroup))?;
        if self.attached.contains_key(&id) {
            return Ok(id);
        }
        let links = attach::PodLinks::attach(&mut self.ebpf, &self.layout, cgroup, id)?;
        self.attached.insert(id, links);
        Ok(id)
    }

    /// Detaches the hooks from a pod's cgroup and removes their pins. New connects from the pod
    /// go where they would without interceptor; established connections are not touched.
    pub fn disable_pod(&mut self, id: CgroupId) -> Result<(), BpfError> {
        if let Some(links) = self.attached.remove(&id) {
            links.detach()?;
        }
        Ok(())
    }

    /// Removes pinned links of cgroups this agent did not enable (a previous agent's pods that
    /// are gone or no longer enabled, or cgroups that were deleted).
    pub fn prune_stale_links(&mut self) -> Result<Vec<CgroupId>, BpfError> {
        Ok(attach::prune(
            &self.layout,
            &self.attached.keys().copied().collect(),
        )?)
    }

    /// Registers a pod-local listening socket (`v6`: the [::1] one) of the pod netns with this
    /// cookie. The hook redirects a pod's connects only while its listener is registered; the
    /// kernel removes the entry when the socket closes, so a dead agent fails open.
    pub fn register_listener(
        &mut self,
        netns_cookie: u64,
        v6: bool,
        socket: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), BpfError> {
        self.maps.register_listener(netns_cookie, v6, socket)
    }

    pub fn set_service(&mut self, addr: SocketAddr, action: ServiceAction) -> Result<(), BpfError> {
        self.maps.set_service(addr, action)
    }

    pub fn remove_service(&mut self, addr: SocketAddr) -> Result<(), BpfError> {
        self.maps.remove_service(addr)
    }

    /// Service entries currently in the kernel map.
    pub fn services(&self) -> Result<Vec<(SocketAddr, ServiceAction)>, BpfError> {
        self.maps.services()
    }

    /// A handle the proxy uses after accept to recover where a connection was going.
    pub fn orig_dst_table(&self) -> OrigDstTable {
        self.maps.orig_dst_table()
    }

    /// Kernel counters summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>, BpfError> {
        self.maps.stats()
    }

    /// Moves kernel log records (when enabled) into the agent's log.
    pub fn drain_kernel_log(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(BpfError::MissingProgram { name })?;
    prog.try_into().map_err(|e| program_load_error(name, &e))
}

/// The verifier's log runs to hundreds of lines; the operator needs its verdict, which is at
/// the end. The whole log is at debug level.
fn program_load_error(name: &'static str, err: &aya::programs::ProgramError) -> BpfError {
    let full = err.to_string();
    tracing::debug!(program = name, log = %full, "program load failed");
    let lines: Vec<&str> = full.lines().collect();
    let detail = if lines.len() <= 6 {
        full.clone()
    } else {
        format!("{} ... {}", lines[0], lines[lines.len() - 5..].join(" | "))
    };
    BpfError::ProgramLoad { name, detail }
}

/// Reads the kernel counters from the pinned stats map, without a running agent.
pub fn read_pinned_stats(pin_root: &Path) -> Result<Vec<(Stat, u64)>, BpfError> {
    maps::read_pinned_stats(&PinLayout::new(pin_root))
}

/// Cgroups whose hooks are pinned (intercepted pods), without a running agent.
pub fn pinned_pods(pin_root: &Path) -> Result<Vec<CgroupId>, BpfError> {
    Ok(attach::pinned_cgroups(&PinLayout::new(pin_root))?)
}

/// Pod-local listeners registered for the hook, as (netns cookie, is IPv6), without a running
/// agent: none while the agent is down, so every hooked pod fails open.
pub fn read_pinned_listeners(pin_root: &Path) -> Result<Vec<(u64, bool)>, BpfError> {
    maps::read_pinned_listeners(&PinLayout::new(pin_root))
}

/// Service entries in the pinned map, without a running agent.
pub fn read_pinned_services(pin_root: &Path) -> Result<Vec<(SocketAddr, ServiceAction)>, BpfError> {
    maps::read_pinned_services(&PinLayout::new(pin_root))
}
