//! Steady state: a writer appends CRI lines at a fixed rate to files that exist before the
//! agent starts, and the agent's CPU share and RSS are sampled over the writing window.
//!
//! Lines are short (40..400 B: the usual traffic; the long tail is the corpus run's job),
//! spread round-robin over the containers, written in one `write` per file per 10 ms
//! tick. The window's first seconds are left out (start-up, first scan). Afterwards the
//! bench waits, bounded, until the receiver holds every written entry, and reports it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BenchError;
use super::corpus::{self, ContainerFile, Format, LineMaker};
use super::procstat;
use super::receiver::Receiver;
use super::runner::{self, Binaries, Subject};

const TICK: Duration = Duration::from_millis(10);

#[derive(Clone, Debug, Serialize)]
pub struct SteadyRun {
    pub subject: Subject,
    pub rate_lines_s: u64,
    pub ok: bool,
    pub error: Option<String>,
    pub window_s: f64,
    /// The rate the writer achieved in the window.
    pub written_lines_s: f64,
    /// CPU seconds per second (1.0 = one core).
    pub cpu_share: f64,
    pub rss_mean_bytes: u64,
    pub rss_max_bytes: u64,
    pub peak_rss_bytes: u64,
    pub written: u64,
    pub received: u64,
    /// Seconds after the writer stopped until the receiver held every entry.
    pub drain_s: Option<f64>,
}

pub struct SteadyJob<'a> {
    pub subject: Subject,
    pub rate: u64,
    pub duration: Duration,
    pub warmup: Duration,
    pub containers: usize,
    pub bins: &'a Binaries,
    pub receiver: &'a Receiver,
    pub dir: PathBuf,
}

pub async fn steady_run(job: SteadyJob<'_>) -> SteadyRun {
    let mut run = SteadyRun {
        subject: job.subject,
        rate_lines_s: job.rate,
        ok: false,
        error: None,
        window_s: 0.0,
        written_lines_s: 0.0,
        cpu_share: 0.0,
        rss_mean_bytes: 0,
        rss_max_bytes: 0,
        peak_rss_bytes: 0,
        written: 0,
        received: 0,
        drain_s: None,
    };
    if let Err(e) = measure(&job, &mut run).await {
        run.error = Some(e.to_string());
    }
    run
}

async fn measure(job: &SteadyJob<'_>, run: &mut SteadyRun) -> Result<(), BenchError> {
    let root = job.dir.join("var/log/pods");
    if job.dir.exists() {
        std::fs::remove_dir_all(&job.dir).map_err(BenchError::io(&job.dir))?;
    }
    // Pods of their own (a different seed), so no state is shared with the corpus.
    let files: Vec<ContainerFile> = corpus::containers(0x57ead7, job.containers.div_ceil(2))
        .into_iter()
        .take(job.containers)
        .collect();
    let mut handles = Vec::new();
    for file in &files {
        let path = root.join(file.rel_path());
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(BenchError::io(parent))?;
        }
        let handle = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(BenchError::io(&path))?;
        handles.push((path, handle, file.format));
    }
    let tenant = logpipe_e2e::store::unique_tenant();
    let tally = job.receiver.tally(&tenant);
    let mut process = runner::start(
        job.subject,
        job.bins,
        &root,
        job.receiver,
        &tenant,
        &job.dir.join("run"),
    )?;
    if !runner::wait_ready(&process.http, Duration::from_secs(30)).await {
        return Err(BenchError::Other(format!(
            "{} not ready after 30 s:\n{}",
            job.subject.name(),
            process.log_tail()
        )));
    }
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let written = written.clone();
        let stop = stop.clone();
        let rate = job.rate;
        let duration = job.duration;
        tokio::task::spawn_blocking(move || write_at_rate(handles, rate, duration, &written, &stop))
    };
    // Sample for the writing window, after the warm-up.
    let started = Instant::now();
    tokio::time::sleep(job.warmup).await;
    let first = procstat::sample(process.pid)?;
    let window_start = Instant::now();
    let written_at_start = written.load(Ordering::Relaxed);
    let mut rss_sum = 0u128;
    let mut rss_n = 0u64;
    let mut last = first;
    while started.elapsed() < job.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(why) = process.exited() {
            stop.store(true, Ordering::Relaxed);
            return Err(BenchError::Other(format!("{} {why}", job.subject.name())));
        }
        last = procstat::sample(process.pid)?;
        rss_sum += u128::from(last.rss);
        rss_n += 1;
        run.rss_max_bytes = run.rss_max_bytes.max(last.rss);
    }
    let window = window_start.elapsed().as_secs_f64();
    let written_in_window = written.load(Ordering::Relaxed) - written_at_start;
    stop.store(true, Ordering::Relaxed);
    let write_result = writer
        .await
        .map_err(|e| BenchError::Other(format!("steady writer task: {e}")))?;
    write_result?;
    run.window_s = window;
    run.cpu_share = (last.cpu_s - first.cpu_s) / window;
    run.written_lines_s = written_in_window as f64 / window;
    run.rss_mean_bytes = u64::try_from(rss_sum / u128::from(rss_n.max(1))).unwrap_or(u64::MAX);
    run.written = written.load(Ordering::Relaxed);
    // Drain: bounded wait for the receiver to hold everything written.
    let drain_start = Instant::now();
    while drain_start.elapsed() < Duration::from_secs(30) {
        if tally.entries() >= run.written {
            run.drain_s = Some(drain_start.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.received = tally.entries();
    run.peak_rss_bytes = procstat::sample(process.pid)
        .map(|s| s.hwm)
        .unwrap_or(last.hwm);
    drop(process);
    job.receiver.forget(&tenant);
    run.ok = run.received == run.written;
    if !run.ok {
        run.error = Some(format!(
            "received {} of {} written entries",
            run.received, run.written
        ));
    }
    Ok(())
}

/// Append `rate` lines per second, spread over the files, until `duration` or `stop`.
fn write_at_rate(
    mut files: Vec<(PathBuf, File, Format)>,
    rate: u64,
    duration: Duration,
    written: &AtomicU64,
    stop: &AtomicBool,
) -> Result<(), BenchError> {
    let mut maker = LineMaker::new(rate);
    let start = Instant::now();
    let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); files.len()];
    let mut text = String::new();
    let mut next = 0usize;
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let now_ns = crate::now_ns();
        for _ in done..due {
            let index = next % files.len().max(1);
            next += 1;
            let len = maker.short_length();
            maker.entry(files[index].2, len, now_ns, &mut text);
            let stream = if maker.rng().chance(100) {
                "stderr"
            } else {
                "stdout"
            };
            let buf = &mut buffers[index];
            buf.extend_from_slice(corpus::cri_time(now_ns).as_bytes());
            buf.push(b' ');
            buf.extend_from_slice(stream.as_bytes());
            buf.extend_from_slice(b" F ");
            buf.extend_from_slice(text.as_bytes());
            buf.push(b'\n');
        }
        for ((path, file, _), buf) in files.iter_mut().zip(buffers.iter_mut()) {
            if !buf.is_empty() {
                file.write_all(buf)
                    .map_err(BenchError::io(path.as_path()))?;
                buf.clear();
            }
        }
        written.fetch_add(due.saturating_sub(done), Ordering::Relaxed);
        done = done.max(due);
        std::thread::sleep(TICK);
    }
    Ok(())
}

/// The steady-state directory of one (subject, rate).
pub fn dir(base: &Path, subject: Subject, rate: u64) -> PathBuf {
    base.join(format!("steady-{}-{rate}", subject.name()))
}
