//! CPU time and memory of a running process, from `/proc/<pid>/stat` and `status`.
//!
//! Sampled while the process runs (not taken from `wait4` after it is killed), because
//! the figure that matters is the CPU spent up to the moment the last entry arrived, not
//! what shutdown costs afterwards.

use std::path::PathBuf;

use super::BenchError;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// utime + stime of all threads, seconds.
    pub cpu_s: f64,
    /// VmRSS, bytes.
    pub rss: u64,
    /// VmHWM (peak RSS so far), bytes.
    pub hwm: u64,
}

pub fn sample(pid: u32) -> Result<Sample, BenchError> {
    let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(&stat_path).map_err(BenchError::io(&stat_path))?;
    let cpu_s = parse_stat(&stat)
        .ok_or_else(|| BenchError::Other(format!("{}: unexpected format", stat_path.display())))?;
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&status_path).map_err(BenchError::io(&status_path))?;
    Ok(Sample {
        cpu_s,
        rss: status_kib(&status, "VmRSS:").unwrap_or(0) * 1024,
        hwm: status_kib(&status, "VmHWM:").unwrap_or(0) * 1024,
    })
}

fn ticks_per_second() -> f64 {
    let ticks = rustix::param::clock_ticks_per_second();
    if ticks == 0 { 100.0 } else { ticks as f64 }
}

/// utime + stime in seconds. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second())
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Total CPU time of the whole machine (all processes), seconds, from `/proc/stat`: the
/// bench reports how busy the machine was besides the measured process.
pub fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: u64 = values
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy as f64 / ticks_per_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss > 0 && s.hwm >= s.rss && s.cpu_s >= 0.0);
        let odd = "42 (a b) c) S 1 1 1 0 -1 0 0 0 0 0 250 50 0 0";
        assert_eq!(
            parse_stat(odd).map(|s| (s * ticks_per_second()).round()),
            Some(300.0)
        );
        assert!(machine_busy_s().is_some());
    }
}
