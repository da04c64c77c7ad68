//! How this machine's idle CPUs wait, and the one setting the bench changes for an info row:
//! the guest halt polling of KVM guests (the `haltpoll` cpuidle driver and governor).
//!
//! With halt polling an idle vCPU polls for a while before it halts, so a wake-up finds it
//! running: no IPI to deliver and no VM exit. With `guest_halt_poll_ns` at 0 every wake-up of
//! an idle vCPU pays both, and a proxy on its own CPU is woken twice per request. The kernel's
//! default is 200 us; some VM images set 0 to save host CPU.
//!
//! Kernel documentation: Documentation/virt/guest-halt-polling.rst.

use std::io;

const DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";
const HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// `guest_halt_poll_ns` as the kernel ships it (drivers/cpuidle/governors/haltpoll.c).
pub const KERNEL_DEFAULT_NS: u64 = 200_000;

/// The idle setup found on the machine.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IdleSetup {
    /// cpuidle driver (`haltpoll` in a KVM guest that has it; `none` or absent elsewhere).
    pub driver: Option<String>,
    /// `guest_halt_poll_ns`, when the haltpoll module is there.
    pub halt_poll_ns: Option<u64>,
}

impl IdleSetup {
    pub fn read() -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
        };
        Self {
            driver: read(DRIVER),
            halt_poll_ns: read(HALT_POLL_NS).and_then(|v| v.parse().ok()),
        }
    }

    /// Why the halt-polling info rows cannot run here, if they cannot: they need the haltpoll
    /// driver, and they only say something when polling is below the kernel's default.
    pub fn why_not_raisable(&self) -> Option<String> {
        if self.driver.as_deref() != Some("haltpoll") {
            return Some(format!(
                "cpuidle driver is {}, not haltpoll (not a KVM guest with guest halt polling)",
                self.driver.as_deref().unwrap_or("absent")
            ));
        }
        match self.halt_poll_ns {
            None => Some(format!("{HALT_POLL_NS} is not readable")),
            Some(ns) if ns >= KERNEL_DEFAULT_NS => Some(format!(
                "guest_halt_poll_ns is already {ns}: the main rows ran with halt polling"
            )),
            Some(_) => None,
        }
    }

    /// One phrase for the run's header.
    pub fn describe(&self) -> String {
        match (&self.driver, self.halt_poll_ns) {
            (Some(d), Some(ns)) => {
                format!("cpuidle {d}, guest_halt_poll_ns {ns} (kernel default {KERNEL_DEFAULT_NS})")
            }
            (Some(d), None) => format!("cpuidle {d}"),
            (None, _) => "no cpuidle driver".into(),
        }
    }
}

/// `guest_halt_poll_ns` set to a value for as long as this lives; the value found is written
/// back on drop (also when the bench unwinds after Ctrl-C). A SIGKILL leaves the new value.
pub struct HaltPollOverride {
    previous: u64,
}

impl HaltPollOverride {
    pub fn set(ns: u64) -> io::Result<Self> {
        let previous = std::fs::read_to_string(HALT_POLL_NS)?
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("{HALT_POLL_NS}: {e}")))?;
        std::fs::write(HALT_POLL_NS, ns.to_string())?;
        Ok(Self { previous })
    }
}

impl Drop for HaltPollOverride {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(HALT_POLL_NS, self.previous.to_string()) {
            eprintln!(
                "could not restore {HALT_POLL_NS} to {}: {e}; set it by hand",
                self.previous
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(driver: Option<&str>, ns: Option<u64>) -> IdleSetup {
        IdleSetup {
            driver: driver.map(str::to_string),
            halt_poll_ns: ns,
        }
    }

    #[test]
    fn the_rows_run_only_on_a_haltpoll_guest_that_polls_less_than_the_default() {
        assert_eq!(setup(Some("haltpoll"), Some(0)).why_not_raisable(), None);
        assert_eq!(
            setup(Some("haltpoll"), Some(50_000)).why_not_raisable(),
            None
        );
        let already = setup(Some("haltpoll"), Some(KERNEL_DEFAULT_NS)).why_not_raisable();
        assert!(already.is_some_and(|w| w.contains("already 200000")));
        let bare = setup(Some("intel_idle"), None).why_not_raisable();
        assert!(bare.is_some_and(|w| w.contains("intel_idle, not haltpoll")));
        let none = setup(None, None).why_not_raisable();
        assert!(none.is_some_and(|w| w.contains("absent")));
        let unreadable = setup(Some("haltpoll"), None).why_not_raisable();
        assert!(unreadable.is_some_and(|w| w.contains("not readable")));
    }

    #[test]
    fn the_header_says_how_idle_cpus_wait() {
        assert_eq!(
            setup(Some("haltpoll"), Some(0)).describe(),
            "cpuidle haltpoll, guest_halt_poll_ns 0 (kernel default 200000)"
        );
        assert_eq!(
            setup(Some("acpi_idle"), None).describe(),
            "cpuidle acpi_idle"
        );
        assert_eq!(setup(None, None).describe(), "no cpuidle driver");
    }
}
