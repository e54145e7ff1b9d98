//! Measurements made off the reconcile: a step's baseline and its verifications.
//!
//! Flow: a reconcile asks [`Verifier::baseline_or_start`] or
//! [`Verifier::measurements_or_start`] with the key of what it needs. A matching answer
//! is returned at once; otherwise a measurement starts in the background (one at a time
//! per LogPipeline), the reconcile plans without it (the step holds), and `done` wakes the
//! next reconcile when the answer is in.
//!
//! Guarantees: a reconcile never waits for an agent or the store; an answer is used only
//! for the key it was made for (LogPipeline, revision, step, step start, and for a
//! verification whether it is the final check), so a measurement started before the
//! window ended never passes the final check. A verification's answer is taken by the
//! reconcile that judges it (judged once); a baseline is kept for its step (a reconcile
//! that does not see it in the status yet gets the same one). Memory: one answer of each
//! kind per LogPipeline, forgotten when it is deleted.
//!
//! Caveats: checks during a window (not the final one) start at most every
//! [`WINDOW_CHECK_SPACING`]: before, every reconcile scraped the step's agents, so at
//! 1,000 nodes a rollout woken by pod events scraped hundreds of agents several times a
//! second.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Measurements, StoreQuery, Target, Verifier};
use crate::crd::StreamBaseline;

/// Fewest time between two checks of one LogPipeline during a step's window.
pub const WINDOW_CHECK_SPACING: Duration = Duration::from_secs(2);

/// Which step of which rollout a measurement describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepKey {
    /// The LogPipeline's uid.
    pub pipeline: String,
    /// The revision moving in.
    pub revision: String,
    pub step: usize,
    /// When the step started (`status.stepStartedAt`): a step tried again after a
    /// rollback is measured again.
    pub started: Option<String>,
}

/// Which verification a measurement answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeasureKey {
    pub step: StepKey,
    /// Made after the step's window ended (the check that moves the rollout on).
    pub final_check: bool,
}

/// What a verification asks: the step's agents, and the store at the end of the window.
#[derive(Clone, Debug)]
pub struct MeasureRequest {
    pub targets: Vec<Target>,
    pub port: i32,
    pub store: Option<StoreQuery>,
}

/// Per LogPipeline uid: the last answer and what it answers, and whether one is being made.
#[derive(Debug)]
pub(super) struct Jobs<K, V> {
    answers: HashMap<String, (K, V)>,
    running: HashSet<String>,
    started: HashMap<String, Instant>,
}

impl<K, V> Default for Jobs<K, V> {
    fn default() -> Self {
        Self {
            answers: HashMap::new(),
            running: HashSet::new(),
            started: HashMap::new(),
        }
    }
}

impl<K: PartialEq, V: Clone> Jobs<K, V> {
    fn kept(&self, pipeline: &str, key: &K) -> Option<V> {
        self.answers
            .get(pipeline)
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn take(&mut self, pipeline: &str, key: &K) -> Option<V> {
        let matches = self.answers.get(pipeline).is_some_and(|(k, _)| k == key);
        matches
            .then(|| self.answers.remove(pipeline))
            .flatten()
            .map(|(_, v)| v)
    }

    /// Whether a measurement for `pipeline` starts now: none is running and the last one
    /// started at least `spacing` ago. Marks it running.
    fn start(&mut self, pipeline: &str, now: Instant, spacing: Duration) -> bool {
        let recent = self
            .started
            .get(pipeline)
            .is_some_and(|at| now.saturating_duration_since(*at) < spacing);
        if recent || self.running.contains(pipeline) {
            return false;
        }
        self.running.insert(pipeline.to_string());
        self.started.insert(pipeline.to_string(), now);
        true
    }

    fn finish(&mut self, pipeline: String, key: K, value: V) {
        self.running.remove(&pipeline);
        self.answers.insert(pipeline, (key, value));
    }

    pub(super) fn forget(&mut self, pipeline: &str) {
        self.answers.remove(pipeline);
        self.running.remove(pipeline);
        self.started.remove(pipeline);
    }
}

impl Verifier {
    /// The step's baseline ([`Verifier::baseline`]) when it was measured; else `None`,
    /// and it is measured in the background, then `done` runs.
    pub fn baseline_or_start(
        self: &Arc<Self>,
        key: StepKey,
        targets: Vec<Target>,
        port: i32,
        done: impl FnOnce() + Send + 'static,
    ) -> Option<StreamBaseline> {
        let pipeline = key.pipeline.clone();
        let start = {
            let mut jobs = self.step_baselines.lock().ok()?;
            if let Some(known) = jobs.kept(&pipeline, &key) {
                return Some(known);
            }
            jobs.start(&pipeline, Instant::now(), Duration::ZERO)
        };
        if start {
            let verifier = Arc::clone(self);
            tokio::spawn(async move {
                let baseline = verifier.baseline(key.step, &targets, port).await;
                finish(&verifier.step_baselines, pipeline, key, baseline);
                done();
            });
        }
        None
    }

    /// The verification `key` names ([`Verifier::measure`]) when it was made; else `None`,
    /// and it is made in the background, then `done` runs. The answer is taken: the next
    /// ask starts another.
    pub fn measurements_or_start(
        self: &Arc<Self>,
        key: MeasureKey,
        request: MeasureRequest,
        done: impl FnOnce() + Send + 'static,
    ) -> Option<Measurements> {
        let pipeline = key.step.pipeline.clone();
        let spacing = if key.final_check {
            Duration::ZERO
        } else {
            WINDOW_CHECK_SPACING
        };
        let start = {
            let mut jobs = self.verifications.lock().ok()?;
            if let Some(answer) = jobs.take(&pipeline, &key) {
                return Some(answer);
            }
            jobs.start(&pipeline, Instant::now(), spacing)
        };
        if start {
            let verifier = Arc::clone(self);
            tokio::spawn(async move {
                let MeasureRequest {
                    targets,
                    port,
                    store,
                } = request;
                let measured = verifier
                    .measure(&targets, port, store.as_ref(), key.final_check)
                    .await;
                finish(&verifier.verifications, pipeline, key, measured);
                done();
            });
        }
        None
    }

    /// Forget what was measured for a LogPipeline (it was deleted).
    pub fn forget(&self, pipeline: &str) {
        if let Ok(mut jobs) = self.step_baselines.lock() {
            jobs.forget(pipeline);
        }
        if let Ok(mut jobs) = self.verifications.lock() {
            jobs.forget(pipeline);
        }
    }
}

fn finish<K, V>(jobs: &Mutex<Jobs<K, V>>, pipeline: String, key: K, value: V)
where
    K: PartialEq,
    V: Clone,
{
    if let Ok(mut jobs) = jobs.lock() {
        jobs.finish(pipeline, key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_job_at_a_time_per_pipeline_spaced_and_answers_only_their_key() {
        let mut jobs: Jobs<u32, &str> = Jobs::default();
        let t0 = Instant::now();
        let spacing = Duration::from_secs(2);
        assert!(jobs.start("a", t0, spacing), "nothing runs: starts");
        assert!(!jobs.start("a", t0, Duration::ZERO), "one runs already");
        assert!(
            jobs.start("b", t0, spacing),
            "another pipeline's is its own"
        );
        jobs.finish("a".into(), 1, "one");
        assert_eq!(jobs.take("a", &2), None, "another key is not answered");
        assert_eq!(jobs.kept("a", &1), Some("one"), "kept: still there");
        assert_eq!(jobs.take("a", &1), Some("one"));
        assert_eq!(jobs.take("a", &1), None, "taken once");
        assert!(
            !jobs.start("a", t0 + Duration::from_secs(1), spacing),
            "too soon after the last start"
        );
        assert!(jobs.start("a", t0 + spacing, spacing));
        jobs.forget("a");
        assert!(jobs.start("a", t0 + spacing, spacing), "forgotten: free");
    }
}
