//! Moving nodes to the target revision: which old-revision agent pods to delete now.
//!
//! The DaemonSet is `OnDelete`, so a pod only changes revision when the operator deletes
//! it. This module is the minimal, unverified mover (all nodes, `maxUnavailable` at a
//! time); the phased engine (canary, verified steps, rollback) replaces [`plan`] with a
//! state machine that calls the same primitive for each step's nodes.
//!
//! Guarantees: never more than `maxUnavailable` agent pods unavailable because of the
//! operator (pods already unavailable count against the budget); nothing moves while
//! `spec.rollout.paused` is true; a pod already being deleted is never deleted again.

/// What the mover needs to know about one agent pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub node: Option<String>,
    /// `logpipe.io/revision` of the pod (absent on pods from another operator version).
    pub revision: Option<String>,
    pub ready: bool,
    /// Has a deletionTimestamp (terminating).
    pub terminating: bool,
}

/// The decision: pods to delete now, and whether there is more to do later.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    pub delete: Vec<String>,
    /// Old-revision pods left after this batch (waiting for budget or for `paused`).
    pub remaining: usize,
}

impl Plan {
    pub fn done(&self) -> bool {
        self.delete.is_empty() && self.remaining == 0
    }
}

/// Choose the next batch. `desired` is the number of nodes that should run an agent
/// (missing pods count as unavailable).
pub fn plan(
    pods: &[PodView],
    target: &str,
    desired: i32,
    max_unavailable: i32,
    paused: bool,
) -> Plan {
    let live: Vec<&PodView> = pods.iter().filter(|p| !p.terminating).collect();
    let old: Vec<&PodView> = live
        .iter()
        .copied()
        .filter(|p| p.revision.as_deref() != Some(target))
        .collect();
    if paused || old.is_empty() {
        return Plan {
            delete: Vec::new(),
            remaining: old.len(),
        };
    }
    let missing = usize::try_from(desired)
        .unwrap_or(0)
        .saturating_sub(live.len());
    let unavailable = live.iter().filter(|p| !p.ready).count()
        + pods.iter().filter(|p| p.terminating).count()
        + missing;
    let budget = usize::try_from(max_unavailable.max(1)).unwrap_or(1);
    // Old pods that are not Ready cost nothing to replace: take them first, then Ready
    // ones within the budget; by name for a stable, reviewable order.
    let mut not_ready: Vec<&PodView> = old.iter().copied().filter(|p| !p.ready).collect();
    let mut ready: Vec<&PodView> = old.iter().copied().filter(|p| p.ready).collect();
    not_ready.sort_by(|a, b| a.name.cmp(&b.name));
    ready.sort_by(|a, b| a.name.cmp(&b.name));
    let mut delete: Vec<String> = not_ready.iter().map(|p| p.name.clone()).collect();
    let room = budget.saturating_sub(unavailable);
    delete.extend(ready.iter().take(room).map(|p| p.name.clone()));
    let remaining = old.len() - delete.len();
    Plan { delete, remaining }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, revision: &str, ready: bool, terminating: bool) -> PodView {
        PodView {
            name: name.into(),
            node: Some(format!("node-{name}")),
            revision: Some(revision.into()),
            ready,
            terminating,
        }
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            pods: Vec<PodView>,
            desired: i32,
            max_unavailable: i32,
            paused: bool,
            delete: &'static [&'static str],
            remaining: usize,
        }
        let cases = [
            Case {
                name: "all on target: nothing to do",
                pods: vec![pod("a", "new", true, false), pod("b", "new", true, false)],
                desired: 2,
                max_unavailable: 1,
                paused: false,
                delete: &[],
                remaining: 0,
            },
            Case {
                name: "one at a time",
                pods: vec![pod("b", "old", true, false), pod("a", "old", true, false)],
                desired: 2,
                max_unavailable: 1,
                paused: false,
                delete: &["a"],
                remaining: 1,
            },
            Case {
                name: "a terminating pod uses the budget",
                pods: vec![pod("a", "old", true, true), pod("b", "old", true, false)],
                desired: 2,
                max_unavailable: 1,
                paused: false,
                delete: &[],
                remaining: 1,
            },
            Case {
                name: "a missing pod uses the budget",
                pods: vec![pod("b", "old", true, false)],
                desired: 2,
                max_unavailable: 1,
                paused: false,
                delete: &[],
                remaining: 1,
            },
            Case {
                name: "an unready old pod is replaced for free",
                pods: vec![pod("a", "old", false, false), pod("b", "old", true, false)],
                desired: 2,
                max_unavailable: 1,
                paused: false,
                delete: &["a"],
                remaining: 1,
            },
            Case {
                name: "a new pod not yet Ready holds the next batch",
                pods: vec![pod("a", "new", false, false), pod("b", "old", true, false)],
                desired: 2,
                max_unavailable: 1,
                paused: false,
                delete: &[],
                remaining: 1,
            },
            Case {
                name: "maxUnavailable 2 moves two",
                pods: vec![
                    pod("a", "old", true, false),
                    pod("b", "old", true, false),
                    pod("c", "old", true, false),
                ],
                desired: 3,
                max_unavailable: 2,
                paused: false,
                delete: &["a", "b"],
                remaining: 1,
            },
            Case {
                name: "paused moves nothing",
                pods: vec![pod("a", "old", false, false)],
                desired: 1,
                max_unavailable: 1,
                paused: true,
                delete: &[],
                remaining: 1,
            },
        ];
        for case in cases {
            let plan = plan(
                &case.pods,
                "new",
                case.desired,
                case.max_unavailable,
                case.paused,
            );
            assert_eq!(plan.delete, case.delete, "{}", case.name);
            assert_eq!(plan.remaining, case.remaining, "{}", case.name);
        }
    }
}
