//! Pieces of `cargo xtask bench` (tests/src/bin/bench.rs): the in-pod load client, process
//! accounting from /proc, h2load output parsing, and the chart.

pub mod chart;
pub mod guest_idle;
pub mod h2serve;
pub mod load;
pub mod open_loop;

use std::path::Path;

/// A process and its descendants (nginx's master and worker), from /proc/PID/task/*/children.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// utime + stime of the whole tree (every thread), in microseconds.
pub fn cpu_micros(pid: u32) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    process_tree(pid)
        .into_iter()
        .map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces): state is field 3, utime
            // and stime are fields 14 and 15.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            num(11) + num(12)
        })
        .sum::<u64>()
        * 1_000_000
        / ticks_per_s
}

/// VmRSS of the whole tree, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// What one h2load run reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct H2loadResult {
    pub succeeded: u64,
    /// failed (h2load counts errored and timed-out requests in it too) + 4xx + 5xx.
    pub errors: u64,
    pub rps: f64,
}

/// Parses h2load's summary ("finished in 2.00s, 51234.50 req/s, ..." and "requests: ...").
pub fn parse_h2load(text: &str) -> Option<H2loadResult> {
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))?
        .split(',')
        .find(|f| f.trim().ends_with("req/s"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let requests = text.lines().find(|l| l.starts_with("requests:"))?;
    let field = |name: &str| -> Option<u64> {
        requests
            .trim_start_matches("requests:")
            .split(',')
            .find(|f| f.trim().ends_with(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let codes = text.lines().find(|l| l.starts_with("status codes:"));
    let non_2xx: u64 = codes
        .map(|l| {
            l.trim_start_matches("status codes:")
                .split(',')
                .filter(|f| f.trim().ends_with("4xx") || f.trim().ends_with("5xx"))
                .filter_map(|f| f.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Some(H2loadResult {
        succeeded: field("succeeded")?,
        errors: field("failed")? + non_2xx,
        rps,
    })
}

/// Jain's fairness index: 1 when every share is equal, 1/n when one takes everything.
pub fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let sq: f64 = shares.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        return 0.0;
    }
    sum * sum / (shares.len() as f64 * sq)
}

/// max / mean of the shares.
pub fn max_over_mean(shares: &[f64]) -> f64 {
    let mean = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
    let max = shares.iter().copied().fold(0.0, f64::max);
    if mean == 0.0 {
        0.0
    } else {
        max / mean
    }
}

/// Writes a file, creating its directory.
pub fn write_file(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_summary_parses() {
        let text = "finished in 2.00s, 51234.50 req/s, 1.2MB/s\n\
                    requests: 102469 total, 102469 started, 102469 done, 102460 succeeded, 9 failed, 0 errored, 0 timeout\n\
                    status codes: 102460 2xx, 0 3xx, 0 4xx, 9 5xx\n";
        let r = parse_h2load(text).expect("parses");
        assert_eq!(r.succeeded, 102460);
        assert_eq!(r.errors, 18);
        assert!((r.rps - 51234.5).abs() < 1e-9);
    }

    #[test]
    fn fairness() {
        assert!((jain(&[1.0, 1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[4.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert!((max_over_mean(&[4.0, 0.0, 0.0, 0.0]) - 4.0).abs() < 1e-12);
    }
}
