//! Last words: the fatal error's message, written to the container's termination-message
//! file before a non-zero exit, so `kubectl describe pod` (and the operator's verdict)
//! show why the agent died instead of only `CrashLoopBackOff`.
//!
//! Guarantees: never fails the exit harder — a file that cannot be written is a warning
//! in the log. At most [`MAX_MESSAGE_BYTES`] are written (Kubernetes' limit), cut at a
//! character boundary.
//!
//! Assumptions: the kubelet creates the file (default [`DEFAULT_PATH`]) in every
//! container; outside one, the default path is written only if it exists, so a run on a
//! workstation does not create files in `/dev`. A path given explicitly is created.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the kubelet reads a container's termination message (`terminationMessagePath`).
pub const DEFAULT_PATH: &str = logpipe_api::process::TERMINATION_MESSAGE_PATH;
/// The flag that sets it (`--termination-log`); an empty value disables it.
pub const FLAG: &str = logpipe_api::process::FLAG_TERMINATION_LOG;
/// Kubernetes keeps the first 4096 bytes of a termination message.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Where to write the message, from the flag's value (`None`: the flag was not given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The kubelet's file, when it exists.
    Default,
    /// A path given explicitly (created if missing).
    Path(PathBuf),
    /// Given empty: write nothing.
    Disabled,
}

impl Target {
    pub fn from_flag(value: Option<&str>) -> Self {
        match value {
            None => Self::Default,
            Some("") => Self::Disabled,
            Some(path) => Self::Path(PathBuf::from(path)),
        }
    }
}

/// The first [`MAX_MESSAGE_BYTES`] of `message`, at a character boundary.
pub fn truncate(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Write `message` as the termination message; problems are logged, never returned.
pub fn write_message(target: &Target, message: &str) {
    let (path, create) = match target {
        Target::Disabled => return,
        Target::Default => (Path::new(DEFAULT_PATH), false),
        Target::Path(path) => (path.as_path(), true),
    };
    if !create && !path.exists() {
        tracing::debug!(path = %path.display(), "no termination-message file (not in a container)");
        return;
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(create)
        .truncate(true)
        .open(path)
        .and_then(|mut file| file.write_all(truncate(message).as_bytes()));
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "cannot write the termination message");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_message_cut_at_4_kib_on_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("termination-log");
        let target = Target::from_flag(Some(path.to_str().unwrap()));
        write_message(&target, "invalid config: pipeline[2] (regex): missing ]");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "invalid config: pipeline[2] (regex): missing ]"
        );
        let long = format!("x{}", "é".repeat(4000));
        write_message(&target, &long);
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            written.len(),
            MAX_MESSAGE_BYTES - 1,
            "é is 2 bytes: cut before it"
        );
        assert!(long.starts_with(&written));
    }

    #[test]
    fn an_unwritable_or_disabled_target_is_not_an_error() {
        write_message(
            &Target::Path("/nonexistent-dir/termination-log".into()),
            "boom",
        );
        write_message(&Target::Disabled, "boom");
        assert_eq!(Target::from_flag(Some("")), Target::Disabled);
        assert_eq!(Target::from_flag(None), Target::Default);
    }
}
