//! The kubelet's pod log layout, built and parsed the way the kubelet writes it:
//!
//! ```text
//! <root>/<namespace>_<pod name>_<pod uid>/<container>/<restart count>.log
//! <root>/<namespace>_<pod name>_<pod uid>/<container>/<restart count>.log.<YYYYMMDD-hhmmss>
//! <root>/<namespace>_<pod name>_<pod uid>/<container>/<restart count>.log.<YYYYMMDD-hhmmss>.gz
//! ```
//!
//! Namespace and pod names are DNS labels/subdomains and a uid is a UUID, so none of them
//! holds `_`: the directory name splits into exactly three parts. No I/O here.

use std::path::{Path, PathBuf};

/// What a file in a container's log directory is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LogFileKind {
    /// `<n>.log`: the file the container runtime appends to.
    Active,
    /// `<n>.log.<timestamp>`: renamed by the kubelet's rotation, may still receive the
    /// last writes until the runtime reopens its log.
    Rotated,
    /// `<n>.log.<timestamp>.gz`: a rotated file compressed by the kubelet.
    Compressed,
}

/// A parsed pod log path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodLogFile {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: String,
    pub restart: u32,
    pub kind: LogFileKind,
}

/// The pod directory name, `<namespace>_<pod>_<uid>`.
pub fn pod_dir_name(namespace: &str, pod: &str, uid: &str) -> String {
    format!("{namespace}_{pod}_{uid}")
}

/// The active log file of a container run, as the kubelet names it.
pub fn log_path(
    root: &Path,
    namespace: &str,
    pod: &str,
    uid: &str,
    container: &str,
    restart: u32,
) -> PathBuf {
    root.join(pod_dir_name(namespace, pod, uid))
        .join(container)
        .join(format!("{restart}.log"))
}

/// Split a pod directory name into (namespace, pod, uid).
pub fn parse_pod_dir(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.split('_');
    let namespace = parts.next().filter(|s| !s.is_empty())?;
    let pod = parts.next().filter(|s| !s.is_empty())?;
    let uid = parts.next().filter(|s| !s.is_empty())?;
    if parts.next().is_some() {
        return None;
    }
    Some((namespace, pod, uid))
}

/// Parse a log file name inside a container directory: `(restart, kind)`.
pub fn parse_file_name(name: &str) -> Option<(u32, LogFileKind)> {
    let (restart, rest) = name.split_once(".log")?;
    let restart: u32 = restart.parse().ok()?;
    if rest.is_empty() {
        return Some((restart, LogFileKind::Active));
    }
    let suffix = rest.strip_prefix('.')?;
    // The kubelet compresses to `<name>.gz.tmp` and renames; the temporary file is not
    // a log file (it is incomplete until renamed).
    if let Some(stamp) = suffix.strip_suffix(".gz") {
        return (!stamp.is_empty() && !stamp.contains('.'))
            .then_some((restart, LogFileKind::Compressed));
    }
    (!suffix.is_empty() && !suffix.contains('.')).then_some((restart, LogFileKind::Rotated))
}

/// Parse `path`, which must be `<root>/<pod dir>/<container>/<file>`.
pub fn parse(root: &Path, path: &Path) -> Option<PodLogFile> {
    let relative = path.strip_prefix(root).ok()?;
    let mut components = relative.components();
    let pod_dir = components.next()?.as_os_str().to_str()?;
    let container = components.next()?.as_os_str().to_str()?;
    let file = components.next()?.as_os_str().to_str()?;
    if components.next().is_some() || container.is_empty() {
        return None;
    }
    let (namespace, pod, uid) = parse_pod_dir(pod_dir)?;
    let (restart, kind) = parse_file_name(file)?;
    Some(PodLogFile {
        namespace: namespace.to_string(),
        pod: pod.to_string(),
        uid: uid.to_string(),
        container: container.to_string(),
        restart,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_kubelet_layout() {
        let root = Path::new("/var/log/pods");
        let path = log_path(
            root,
            "kube-system",
            "coredns-abc",
            "1234-5678",
            "coredns",
            3,
        );
        assert_eq!(
            path,
            Path::new("/var/log/pods/kube-system_coredns-abc_1234-5678/coredns/3.log")
        );
        let parsed = parse(root, &path).unwrap();
        assert_eq!(parsed.namespace, "kube-system");
        assert_eq!(parsed.pod, "coredns-abc");
        assert_eq!(parsed.uid, "1234-5678");
        assert_eq!(parsed.container, "coredns");
        assert_eq!(parsed.restart, 3);
        assert_eq!(parsed.kind, LogFileKind::Active);
    }

    #[test]
    fn file_kinds() {
        let cases = [
            ("0.log", Some((0, LogFileKind::Active))),
            ("12.log", Some((12, LogFileKind::Active))),
            ("0.log.20240101-101010", Some((0, LogFileKind::Rotated))),
            (
                "0.log.20240101-101010.gz",
                Some((0, LogFileKind::Compressed)),
            ),
            ("0.log.20240101-101010.gz.tmp", None),
            ("0.log.", None),
            ("x.log", None),
            ("0.txt", None),
            ("0.logx", None),
        ];
        for (name, want) in cases {
            assert_eq!(parse_file_name(name), want, "{name}");
        }
    }

    #[test]
    fn rejects_paths_outside_the_layout() {
        let root = Path::new("/r");
        for bad in [
            "/r/ns_pod/c/0.log",
            "/r/ns_pod_uid_x/c/0.log",
            "/r/ns_pod_uid/0.log",
            "/r/ns_pod_uid/c/d/0.log",
            "/other/ns_pod_uid/c/0.log",
            "/r/_pod_uid/c/0.log",
        ] {
            assert!(parse(root, Path::new(bad)).is_none(), "{bad}");
        }
    }
}
