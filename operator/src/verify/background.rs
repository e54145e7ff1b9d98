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
use std::future::Future;
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

/// What a reconcile asks of [`Jobs`]: `key`'s answer for `pipeline`, taken or kept, and
/// how long after the last start another may start.
struct Ask<K> {
    pipeline: String,
    key: K,
    take: bool,
    spacing: Duration,
}

/// What [`Jobs::lookup`] found.
enum Lookup<V> {
    Answer(V),
    /// None yet: a measurement starts now.
    Started,
    /// None yet, and none starts now (one runs, or the last started too recently).
    Waiting,
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

    /// `ask.key`'s answer (taken or kept, as `ask` says); else whether one starts now.
    fn lookup(&mut self, ask: &Ask<K>, now: Instant) -> Lookup<V> {
        let answer = if ask.take {
            self.take(&ask.pipeline, &ask.key)
        } else {
            self.kept(&ask.pipeline, &ask.key)
        };
        match answer {
            Some(answer) => Lookup::Answer(answer),
            None if self.start(&ask.pipeline, now, ask.spacing) => Lookup::Started,
            None => Lookup::Waiting,
        }
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
        let step = key.step;
        let work =
            move |verifier: Arc<Self>| async move { verifier.baseline(step, &targets, port).await };
        let ask = Ask {
            pipeline: key.pipeline.clone(),
            key,
            take: false,
            spacing: Duration::ZERO,
        };
        self.answer_or_start(|v| &v.step_baselines, ask, work, done)
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
        let final_check = key.final_check;
        let work = move |verifier: Arc<Self>| async move {
            let MeasureRequest {
                targets,
                port,
                store,
            } = request;
            verifier
                .measure(&targets, port, store.as_ref(), final_check)
                .await
        };
        let ask = Ask {
            pipeline: key.step.pipeline.clone(),
            key,
            take: true,
            spacing: if final_check {
                Duration::ZERO
            } else {
                WINDOW_CHECK_SPACING
            },
        };
        self.answer_or_start(|v| &v.verifications, ask, work, done)
    }

    /// `ask`'s answer from `jobs`, or `None`, having started `work` when none runs (then
    /// its answer is kept for `ask.key` and `done` runs).
    fn answer_or_start<K, V, W>(
        self: &Arc<Self>,
        jobs: fn(&Self) -> &Mutex<Jobs<K, V>>,
        ask: Ask<K>,
        work: impl FnOnce(Arc<Self>) -> W + Send + 'static,
        done: impl FnOnce() + Send + 'static,
    ) -> Option<V>
    where
        K: PartialEq + Send + 'static,
        V: Clone + Send + 'static,
        W: Future<Output = V> + Send + 'static,
    {
        match jobs(self).lock().ok()?.lookup(&ask, Instant::now()) {
            Lookup::Answer(answer) => return Some(answer),
            Lookup::Waiting => return None,
            Lookup::Started => {}
        }
        let verifier = Arc::clone(self);
        tokio::spawn(async move {
            let answer = work(Arc::clone(&verifier)).await;
            if let Ok(mut jobs) = jobs(&verifier).lock() {
                jobs.finish(ask.pipeline, ask.key, answer);
            }
            done();
        });
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
