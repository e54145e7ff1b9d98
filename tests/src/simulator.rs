//! The node simulator as a test needs it: the test bed's when one runs for the cluster,
//! else a process of the test's own, stopped with SIGTERM (then SIGKILL after 30 s).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Testbed, workspace_binary};

pub struct Simulator {
    child: Option<Child>,
}

impl Simulator {
    /// Use the simulator running for `cluster`, or start one logging to `log`.
    pub fn ensure(testbed: &Testbed, cluster: &str, log: &Path) -> Self {
        let pid_files = [
            testbed
                .dir
                .join("pids")
                .join(format!("{cluster}-nodesim.pid")),
            testbed
                .dir
                .join(cluster)
                .join("nodesim")
                .join("nodesim.pid"),
        ];
        let running = pid_files.iter().any(|file| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|text| text.split_whitespace().next()?.parse::<i32>().ok())
                .is_some_and(logpipe_nodesim::is_simulator)
        });
        if running {
            return Self { child: None };
        }
        let file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let stderr = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share {}: {e}", log.display()));
        let binary = workspace_binary("logpipe-nodesim");
        let child = Command::new(&binary)
            .arg("--kubeconfig")
            .arg(testbed.kubeconfig(cluster))
            .arg("--cluster")
            .arg(cluster)
            .arg("--testbed-dir")
            .arg(&testbed.dir)
            .env("RUST_LOG", "info,logpipe_nodesim=debug")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        Self { child: Some(child) }
    }

    /// SIGTERM, then up to 30 s for it to stop its agents and exit; SIGKILL after.
    /// `false` when it had to be killed. The test bed's simulator is left alone.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..300 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop();
    }
}
