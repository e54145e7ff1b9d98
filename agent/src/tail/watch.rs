//! File-system events for the tailer: which files were written, and whether files or
//! directories appeared, vanished or were renamed, so the tailer reads only what changed
//! and lists the tree only when it changed (plus a slow rescan as the safety net).
//!
//! Flow: one inotify watch (the `notify` crate, recursive over the log root) calls back
//! on its own thread; the callback records the paths written and a "structure changed"
//! flag under a mutex and wakes the tailer, which takes them ([`Watch::take`]) at the
//! top of each loop.
//!
//! Guarantees: nothing is missed silently. An event queue overflow (or an error from the
//! watch) asks for a full rescan with every open file read ([`Changes::everything`]); so
//! does a set of pending paths grown past [`MAX_PATHS`], rather than growing without
//! bound.
//!
//! Caveats: without a watch (the root does not exist yet, or inotify is out of watches)
//! the tailer falls back to listing the tree every poll interval, as before; it retries
//! the watch at each scan.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use notify::event::{EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

/// Pending written paths beyond this turn into one "read everything" request.
pub const MAX_PATHS: usize = 16 * 1024;

/// What happened since the last [`Watch::take`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Files whose content changed.
    pub written: HashSet<PathBuf>,
    /// Something was created, removed or renamed: list the tree.
    pub structure: bool,
    /// Events were lost: list the tree and read every open file.
    pub everything: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.written.is_empty() && !self.structure && !self.everything
    }
}

#[derive(Debug, Default)]
struct Shared {
    changes: Mutex<Changes>,
    woken: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Changes> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, result: notify::Result<notify::Event>) {
        let mut changes = self.lock();
        match result {
            Ok(event) if event.need_rescan() => changes.everything = true,
            Ok(event) => match event.kind {
                EventKind::Modify(ModifyKind::Data(_)) | EventKind::Modify(ModifyKind::Any) => {
                    for path in event.paths {
                        if changes.written.len() >= MAX_PATHS {
                            changes.written.clear();
                            changes.everything = true;
                            break;
                        }
                        if !changes.everything {
                            changes.written.insert(path);
                        }
                    }
                }
                EventKind::Create(_)
                | EventKind::Remove(_)
                | EventKind::Modify(ModifyKind::Name(_)) => changes.structure = true,
                // Opens, closes, attribute changes: nothing to read.
                _ => return,
            },
            Err(e) => {
                tracing::debug!(error = %e, "file watch error, rescanning");
                changes.everything = true;
            }
        }
        drop(changes);
        self.woken.notify_one();
    }
}

/// After the first write event of a wake, notify's thread pauses this long, so a
/// container writing a line a millisecond costs one wake per pause, not one per line.
/// As long as the tailer's poll interval: lines wait up to `batchWait` (1 s by default)
/// in a batch anyway, and 50 ms cost four times the wakes (issue 16: 1,000 files, 10 of
/// them written, 2.0 % of a core with 50 ms).
pub const WRITE_PAUSE: Duration = Duration::from_millis(250);
/// Callbacks closer than this to the previous one's return are of the same read (notify
/// calls back for each event of a buffer in turn): no pause there.
const SAME_READ: Duration = Duration::from_micros(200);
/// A read this large means events come faster than pauses let them through: no pause
/// until a read is small again, so the kernel's queue (16,384 events) does not overflow.
/// A quarter of the queue: a pause lets at most this many through before the next read
/// is a busy one, about 16,000 writes a second with [`WRITE_PAUSE`].
const BUSY_READ: u32 = 4096;

/// Whether notify's thread pauses after an event: a pure decision over times.
#[derive(Debug, Default)]
struct Pacer {
    last_return: Option<Instant>,
    /// Events of the current read so far.
    in_read: u32,
    /// The previous read was large.
    busy: bool,
}

impl Pacer {
    fn after_event(&mut self, written: bool, now: Instant) -> Option<Duration> {
        let same_read = self
            .last_return
            .is_some_and(|t| now.saturating_duration_since(t) < SAME_READ);
        if same_read {
            self.in_read += 1;
            if self.in_read >= BUSY_READ {
                self.busy = true;
            }
            return None;
        }
        // A fresh wake: the previous read is over.
        self.busy = self.in_read >= BUSY_READ;
        self.in_read = 1;
        (written && !self.busy).then_some(WRITE_PAUSE)
    }

    fn returned(&mut self, now: Instant) {
        self.last_return = Some(now);
    }
}

/// An inotify watch of the log root.
pub struct Watch {
    shared: Arc<Shared>,
    _watcher: RecommendedWatcher,
}

impl Watch {
    /// Watch `root` and everything under it.
    pub fn start(root: &Path) -> notify::Result<Self> {
        let shared = Arc::new(Shared::default());
        let sink = shared.clone();
        let mut pacer = Pacer::default();
        let mut watcher =
            notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
                let written = matches!(&result, Ok(e) if matches!(
                    e.kind,
                    EventKind::Modify(ModifyKind::Data(_)) | EventKind::Modify(ModifyKind::Any)
                ));
                sink.record(result);
                // On notify's thread: while it sleeps, the kernel queues the events, and the
                // next read takes them all at once.
                if let Some(pause) = pacer.after_event(written, Instant::now()) {
                    std::thread::sleep(pause);
                }
                pacer.returned(Instant::now());
            })?;
        watcher.watch(root, RecursiveMode::Recursive)?;
        Ok(Self {
            shared,
            _watcher: watcher,
        })
    }

    /// Everything recorded since the last call.
    pub fn take(&self) -> Changes {
        std::mem::take(&mut *self.shared.lock())
    }

    /// Wait until something is recorded, at most `timeout`.
    pub fn wait(&self, timeout: Duration) {
        let changes = self.shared.lock();
        let _ = self
            .shared
            .woken
            .wait_timeout_while(changes, timeout, |c| c.is_empty())
            .unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn wait_for(watch: &Watch, what: impl Fn(&Changes) -> bool) -> Changes {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut all = Changes::default();
        while Instant::now() < deadline {
            watch.wait(Duration::from_millis(100));
            let c = watch.take();
            all.written.extend(c.written);
            all.structure |= c.structure;
            all.everything |= c.everything;
            if what(&all) {
                return all;
            }
        }
        panic!("no such event: {all:?}");
    }

    #[test]
    fn pauses_once_per_wake_and_not_when_behind() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut pacer = Pacer::default();
        // A fresh write wakes the thread: pause.
        assert_eq!(pacer.after_event(true, ms(0)), Some(WRITE_PAUSE));
        pacer.returned(ms(50));
        // The events queued meanwhile come back to back: no pause among them.
        for _ in 0..10 {
            assert_eq!(pacer.after_event(true, ms(50)), None);
            pacer.returned(ms(50));
        }
        // A later wake pauses again; one for a structure change does not.
        assert_eq!(pacer.after_event(false, ms(80)), None);
        pacer.returned(ms(80));
        assert_eq!(pacer.after_event(true, ms(90)), Some(WRITE_PAUSE));
        pacer.returned(ms(140));
        // A read of many events: the next wake does not pause, until a read is small.
        for _ in 0..BUSY_READ {
            assert_eq!(pacer.after_event(true, ms(140)), None);
            pacer.returned(ms(140));
        }
        assert_eq!(pacer.after_event(true, ms(150)), None, "behind: no pause");
        pacer.returned(ms(150));
        assert_eq!(pacer.after_event(true, ms(160)), Some(WRITE_PAUSE));
    }

    #[test]
    fn reports_writes_and_new_files_in_new_directories() {
        let dir = tempfile::tempdir().unwrap();
        let watch = Watch::start(dir.path()).unwrap();
        let sub = dir.path().join("ns_pod_uid/app");
        std::fs::create_dir_all(&sub).unwrap();
        wait_for(&watch, |c| c.structure);
        // The new directory is watched too (notify adds it on its creation event).
        std::thread::sleep(Duration::from_millis(100));
        let path = sub.join("0.log");
        let mut file = std::fs::File::create(&path).unwrap();
        wait_for(&watch, |c| c.structure);
        file.write_all(b"line\n").unwrap();
        let c = wait_for(&watch, |c| c.written.contains(&path) || c.everything);
        assert!(c.written.contains(&path) || c.everything, "{c:?}");
        assert!(watch.take().is_empty());
    }
}
