//! Agent processes: start, signal, wait, and the records that let a restarted simulator
//! find the processes it left behind.
//!
//! Each agent runs in its own process group (like a container's PID namespace): SIGTERM
//! goes to the main process only, as the container runtime sends it to PID 1, and when
//! the main process is gone whatever it left in its group is SIGKILLed, as the runtime
//! tears the namespace down.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use serde::{Deserialize, Serialize};

/// What the simulator records per running agent, in `<state>/pods/<uid>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub pid: i32,
    /// Start time of the process in clock ticks since boot (`/proc/<pid>/stat`), so a
    /// recycled PID is never mistaken for our agent.
    pub start_ticks: u64,
    pub binary: PathBuf,
    pub pod_ip: String,
    /// Node of the pod: with `pod_ip`, reserves the IP while a leftover agent still
    /// holds it.
    #[serde(default)]
    pub node: String,
    /// RFC 3339 time the process started (the container's `startedAt`).
    pub started_at: String,
}

impl Record {
    pub fn path(state_dir: &Path, uid: &str) -> PathBuf {
        state_dir.join("pods").join(format!("{uid}.json"))
    }

    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(state_dir, &self.uid);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(tmp, path)
    }

    pub fn remove(state_dir: &Path, uid: &str) {
        let _ = std::fs::remove_file(Self::path(state_dir, uid));
    }

    /// All records; unreadable ones are removed with a warning (they can name no process
    /// we could safely signal).
    pub fn load_all(state_dir: &Path) -> Vec<Record> {
        let Ok(entries) = std::fs::read_dir(state_dir.join("pods")) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
            {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "dropping unreadable process record");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records
    }

    /// The recorded process, if it still runs and is the one we started.
    pub fn live_process(&self) -> Option<Proc> {
        (start_ticks(self.pid) == Some(self.start_ticks) && !is_zombie(self.pid)).then(|| {
            Proc::Adopted {
                pid: self.pid,
                start_ticks: self.start_ticks,
            }
        })
    }
}

/// `starttime` (field 22) of `/proc/<pid>/stat`.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// None when killed by a signal, or unknown (a process adopted from an earlier run
    /// of the simulator is not our child: its status is not ours to read).
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Exit {
    /// The exit code a container runtime reports: 128+signal for a signal.
    pub fn container_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }

    pub fn reason(&self) -> &'static str {
        match (self.code, self.signal) {
            (Some(0), _) => "Completed",
            (None, None) => "Unknown",
            _ => "Error",
        }
    }
}

/// A running agent: our child, or one adopted from an earlier run of the simulator.
#[derive(Debug)]
pub enum Proc {
    Child {
        child: tokio::process::Child,
        pid: i32,
    },
    Adopted {
        pid: i32,
        start_ticks: u64,
    },
}

/// What to start.
pub struct Launch<'a> {
    pub binary: &'a Path,
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    pub log: &'a Path,
    pub banner: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot open log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {binary}: {source}")]
    Start {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("started {binary} but it has no PID (it exited at once)")]
    NoPid { binary: PathBuf },
}

impl Proc {
    pub fn spawn(launch: &Launch<'_>) -> Result<Self, SpawnError> {
        let log_err = |source| SpawnError::Log {
            path: launch.log.to_path_buf(),
            source,
        };
        if let Some(parent) = launch.log.parent() {
            std::fs::create_dir_all(parent).map_err(log_err)?;
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(launch.log)
            .map_err(log_err)?;
        writeln!(log, "{}", launch.banner).map_err(log_err)?;
        let stderr = log.try_clone().map_err(log_err)?;
        std::fs::create_dir_all(launch.cwd).map_err(|source| SpawnError::Start {
            binary: launch.binary.to_path_buf(),
            source,
        })?;
        let child = tokio::process::Command::new(launch.binary)
            .args(launch.args)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(launch.cwd)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .process_group(0)
            // Agents outlive a crashed simulator on purpose: the next run adopts them.
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| SpawnError::Start {
                binary: launch.binary.to_path_buf(),
                source,
            })?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| SpawnError::NoPid {
                binary: launch.binary.to_path_buf(),
            })?;
        Ok(Proc::Child { child, pid })
    }

    pub fn pid(&self) -> i32 {
        match self {
            Proc::Child { pid, .. } | Proc::Adopted { pid, .. } => *pid,
        }
    }

    /// Wait for the main process to end. Cancel safe.
    pub async fn wait(&mut self) -> Exit {
        match self {
            Proc::Child { child, .. } => match child.wait().await {
                Ok(status) => Exit {
                    code: status.code(),
                    signal: status.signal(),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot wait for agent process");
                    Exit {
                        code: None,
                        signal: None,
                    }
                }
            },
            Proc::Adopted {
                pid,
                start_ticks: ticks,
            } => {
                // Not our child: poll /proc until it is gone (its parent reaps it).
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    if start_ticks(*pid) != Some(*ticks) || is_zombie(*pid) {
                        return Exit {
                            code: None,
                            signal: None,
                        };
                    }
                }
            }
        }
    }

    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = Pid::from_raw(self.pid())
            && let Err(e) = kill_process(pid, signal)
        {
            tracing::debug!(pid = self.pid(), error = %e, "signal not delivered");
        }
    }

    /// SIGKILL whatever is left in the agent's process group.
    pub fn kill_group(&self) {
        if let Some(pid) = Pid::from_raw(self.pid()) {
            let _ = kill_process_group(pid, Signal::KILL);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL: the kubelet's container stop.
    pub async fn stop(&mut self, grace: Duration) -> Exit {
        self.signal(Signal::TERM);
        let exit = match tokio::time::timeout(grace, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::info!(
                    pid = self.pid(),
                    grace_s = grace.as_secs(),
                    "grace period over, sending SIGKILL"
                );
                self.signal(Signal::KILL);
                self.kill_group();
                match tokio::time::timeout(Duration::from_secs(10), self.wait()).await {
                    Ok(exit) => exit,
                    Err(_) => {
                        tracing::warn!(pid = self.pid(), "agent survived SIGKILL for 10s");
                        Exit {
                            code: None,
                            signal: Some(9),
                        }
                    }
                }
            }
        };
        self.kill_group();
        exit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_start_ticks() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(start_ticks(me).is_some());
        assert_eq!(start_ticks(-1), None);
    }

    #[tokio::test]
    async fn stops_with_sigterm_then_sigkill() {
        let dir = std::env::temp_dir().join(format!("nodesim-proc-{}", std::process::id()));
        let log = dir.join("log");
        let args = vec![
            "-c".to_string(),
            "trap '' TERM; sleep 30 & wait; sleep 30".to_string(),
        ];
        let mut proc = Proc::spawn(&Launch {
            binary: Path::new("/bin/sh"),
            args: &args,
            env: &[],
            cwd: &dir,
            log: &log,
            banner: "test".into(),
        })
        .unwrap();
        // Let the shell install its trap first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        let exit = proc.stop(Duration::from_millis(300)).await;
        assert_eq!(exit.signal, Some(9), "{exit:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
