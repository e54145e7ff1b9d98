//! A pod's volumes as directories on this machine, and the translation of the paths the
//! container would see (its mount paths) to those directories.
//!
//! - ConfigMap, Secret, downwardAPI, projected and emptyDir volumes live in the pod's own
//!   directory (`<state>/pods/<uid>/volumes/<volume>`), written from the API like the
//!   kubelet does.
//! - hostPath volumes live in the node's own tree (`<testbed>/<cluster>/nodes/<node>/<path>`),
//!   so they outlive the pod: the next agent pod on the node finds the positions file
//!   its predecessor saved, and log generators write that node's `/var/log/pods`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, Pod, Secret};
use kube::Api;

use super::downward::Facts;

/// Mount paths (container view) to host directories, longest first so nested mounts win.
#[derive(Clone, Debug, Default)]
pub struct Mounts {
    entries: Vec<(String, PathBuf)>,
}

impl Mounts {
    pub fn new(mut entries: Vec<(String, PathBuf)>) -> Self {
        for (mount, _) in &mut entries {
            while mount.len() > 1 && mount.ends_with('/') {
                mount.pop();
            }
        }
        entries.sort_by_key(|(mount, _)| std::cmp::Reverse(mount.len()));
        Self { entries }
    }

    /// The host path of a container path under one of the mounts.
    pub fn translate(&self, path: &str) -> Option<PathBuf> {
        self.entries.iter().find_map(|(mount, host)| {
            let rest = path.strip_prefix(mount.as_str())?;
            if rest.is_empty() {
                Some(host.clone())
            } else if mount == "/" {
                Some(host.join(rest))
            } else {
                rest.strip_prefix('/').map(|r| host.join(r))
            }
        })
    }

    /// Like [`Mounts::translate`]; a path under no mount lands in the pod's private
    /// `rootfs`, as it would in the container's writable layer (lost with the pod), and
    /// never on this machine's real `/`.
    pub fn translate_or_rootfs(&self, path: &str, rootfs: &Path) -> PathBuf {
        self.translate(path).unwrap_or_else(|| {
            let relative: PathBuf = Path::new(path)
                .components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .collect();
            rootfs.join(relative)
        })
    }

    /// An argument with a container path (`/etc/x` or `--flag=/etc/x`) translated;
    /// anything else unchanged.
    pub fn translate_arg(&self, arg: &str) -> String {
        if let Some((flag, value)) = arg.split_once('=')
            && flag.starts_with('-')
        {
            return match self.translate(value) {
                Some(host) => format!("{flag}={}", host.display()),
                None => arg.to_string(),
            };
        }
        match self.translate(arg) {
            Some(host) => host.display().to_string(),
            None => arg.to_string(),
        }
    }

    /// The agent config text with every path under a mount replaced by its host path,
    /// or None when it names no such path. The text is edited in place so comments and
    /// layout survive; should the edit not parse back to the structurally translated
    /// document, the document is rendered anew instead.
    pub fn translate_document(&self, text: &str) -> Option<String> {
        let original: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
        let mut translated = original.clone();
        let mut changes = Vec::new();
        self.collect_yaml(&mut translated, &mut changes);
        if changes.is_empty() {
            return None;
        }
        changes.sort_by_key(|(old, _)| std::cmp::Reverse(old.len()));
        changes.dedup();
        let mut edited = text.to_string();
        for (old, new) in &changes {
            edited = replace_path(&edited, old, new);
        }
        if serde_yaml::from_str::<serde_yaml::Value>(&edited)
            .ok()
            .as_ref()
            == Some(&translated)
        {
            Some(edited)
        } else {
            serde_yaml::to_string(&translated).ok()
        }
    }

    /// Translate every string of a YAML document that is a path under a mount (the
    /// agent's config names files on its volumes: CA, password, token), noting each
    /// `(old, new)` pair.
    fn collect_yaml(&self, value: &mut serde_yaml::Value, changes: &mut Vec<(String, String)>) {
        match value {
            serde_yaml::Value::String(s) if s.starts_with('/') => {
                if let Some(host) = self.translate(s) {
                    let host = host.display().to_string();
                    changes.push((std::mem::replace(s, host.clone()), host));
                }
            }
            serde_yaml::Value::Sequence(items) => {
                for v in items {
                    self.collect_yaml(v, changes);
                }
            }
            serde_yaml::Value::Mapping(map) => {
                for (_, v) in map.iter_mut() {
                    self.collect_yaml(v, changes);
                }
            }
            serde_yaml::Value::Tagged(tagged) => self.collect_yaml(&mut tagged.value, changes),
            _ => {}
        }
    }
}

/// Replace `old` in `text` where it stands as a whole path (not inside a longer one).
fn replace_path(text: &str, old: &str, new: &str) -> String {
    let is_path_char = |c: char| c.is_alphanumeric() || matches!(c, '/' | '.' | '_' | '-');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(old) {
        out.push_str(&rest[..pos]);
        let before = out.chars().next_back();
        let after = rest[pos + old.len()..].chars().next();
        if before.is_some_and(is_path_char) || after.is_some_and(is_path_char) {
            out.push_str(old);
        } else {
            out.push_str(new);
        }
        rest = &rest[pos + old.len()..];
    }
    out.push_str(rest);
    out
}

/// A relative path made only of normal components (no `..`, no root).
fn safe_relative(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path.trim_start_matches('/'));
    if p.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(p.to_path_buf())
    } else {
        Err(format!("path {path:?} must not contain '..'"))
    }
}

/// Write a file only when its content differs, so re-materialising a running pod's
/// volumes (after a simulator restart) leaves the files its agent reads alone.
fn write_file(path: &Path, content: &[u8], mode: i32) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    if std::fs::read(path).ok().as_deref() != Some(content) {
        std::fs::write(path, content).map_err(fail)?;
    }
    let mode = u32::try_from(mode).unwrap_or(0o644) & 0o777;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)
}

/// Write `data` (key -> content) into `dir`, all keys or the selected `items`.
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: i32,
    what: &str,
) -> Result<(), String> {
    match items {
        Some(items) => {
            for item in items {
                let content = data
                    .get(&item.key)
                    .ok_or_else(|| format!("{what}: key {:?} not found", item.key))?;
                let path = dir.join(safe_relative(&item.path)?);
                write_file(&path, content, item.mode.unwrap_or(default_mode))?;
            }
        }
        None => {
            for (key, content) in data {
                write_file(&dir.join(safe_relative(key)?), content, default_mode)?;
            }
        }
    }
    Ok(())
}

async fn config_map_data(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(cm)) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, ByteString(v))| (k, v)),
            );
            Ok(data)
        }
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(format!("configmap \"{name}\" not found")),
        Err(e) => Err(format!("cannot read configmap \"{name}\": {e}")),
    }
}

async fn secret_data(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(secret)) => {
            let mut data: BTreeMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, ByteString(v))| (k, v))
                .collect();
            data.extend(
                secret
                    .string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
            Ok(data)
        }
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(format!("secret \"{name}\" not found")),
        Err(e) => Err(format!("cannot read secret \"{name}\": {e}")),
    }
}

/// Materialise the volumes `container` mounts and return its mount table. Errors read
/// like the kubelet's `FailedMount` events.
pub async fn materialise(
    client: &kube::Client,
    facts: &Facts<'_>,
    container: &Container,
    pod_dir: &Path,
    node_dir: &Path,
) -> Result<Mounts, String> {
    let pod: &Pod = facts.pod;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut hosts: BTreeMap<String, PathBuf> = BTreeMap::new();
    for volume in &volumes {
        let fail = |e: String| {
            format!(
                "MountVolume.SetUp failed for volume \"{}\": {e}",
                volume.name
            )
        };
        let own_dir = pod_dir
            .join("volumes")
            .join(safe_relative(&volume.name).map_err(fail)?);
        let host = if let Some(host_path) = &volume.host_path {
            let path = node_dir.join(safe_relative(&host_path.path).map_err(fail)?);
            match host_path.type_.as_deref().unwrap_or("") {
                "FileOrCreate" => {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
                    }
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| fail(e.to_string()))?;
                }
                "File" | "Socket" | "CharDevice" | "BlockDevice" => {}
                // "", Directory, DirectoryOrCreate: a node tree starts empty, so even
                // `Directory` is created rather than failing the pod.
                _ => std::fs::create_dir_all(&path).map_err(|e| fail(e.to_string()))?,
            }
            path
        } else if let Some(cm) = &volume.config_map {
            let data = config_map_data(client, namespace, &cm.name, cm.optional.unwrap_or(false))
                .await
                .map_err(fail)?;
            std::fs::create_dir_all(&own_dir).map_err(|e| fail(e.to_string()))?;
            write_keys(
                &own_dir,
                &data,
                cm.items.as_ref(),
                cm.default_mode.unwrap_or(0o644),
                &cm.name,
            )
            .map_err(fail)?;
            own_dir
        } else if let Some(secret) = &volume.secret {
            let name = secret.secret_name.clone().unwrap_or_default();
            let data = secret_data(client, namespace, &name, secret.optional.unwrap_or(false))
                .await
                .map_err(fail)?;
            std::fs::create_dir_all(&own_dir).map_err(|e| fail(e.to_string()))?;
            write_keys(
                &own_dir,
                &data,
                secret.items.as_ref(),
                secret.default_mode.unwrap_or(0o644),
                &name,
            )
            .map_err(fail)?;
            own_dir
        } else if let Some(projected) = &volume.projected {
            std::fs::create_dir_all(&own_dir).map_err(|e| fail(e.to_string()))?;
            let mode = projected.default_mode.unwrap_or(0o644);
            for source in projected.sources.iter().flatten() {
                if let Some(cm) = &source.config_map {
                    let data =
                        config_map_data(client, namespace, &cm.name, cm.optional.unwrap_or(false))
                            .await
                            .map_err(fail)?;
                    write_keys(&own_dir, &data, cm.items.as_ref(), mode, &cm.name).map_err(fail)?;
                }
                if let Some(secret) = &source.secret {
                    let data = secret_data(
                        client,
                        namespace,
                        &secret.name,
                        secret.optional.unwrap_or(false),
                    )
                    .await
                    .map_err(fail)?;
                    write_keys(&own_dir, &data, secret.items.as_ref(), mode, &secret.name)
                        .map_err(fail)?;
                }
                if let Some(downward) = &source.downward_api {
                    write_downward(facts, container, &own_dir, downward.items.as_deref(), mode)
                        .map_err(fail)?;
                }
                // serviceAccountToken sources are left out: agents get the test bed's
                // kubeconfig (--kubeconfig) instead of an in-cluster token.
            }
            own_dir
        } else if let Some(downward) = &volume.downward_api {
            std::fs::create_dir_all(&own_dir).map_err(|e| fail(e.to_string()))?;
            write_downward(
                facts,
                container,
                &own_dir,
                downward.items.as_deref(),
                downward.default_mode.unwrap_or(0o644),
            )
            .map_err(fail)?;
            own_dir
        } else {
            // emptyDir, and any type the simulator does not know: an empty private dir.
            std::fs::create_dir_all(&own_dir).map_err(|e| fail(e.to_string()))?;
            own_dir
        };
        hosts.insert(volume.name.clone(), host);
    }
    let mut entries = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let host = hosts
            .get(&mount.name)
            .ok_or_else(|| format!("volumeMount {:?} names no volume of the pod", mount.name))?;
        let host = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let path = host.join(safe_relative(sub)?);
                if !path.exists() {
                    std::fs::create_dir_all(&path).map_err(|e| format!("subPath {sub:?}: {e}"))?;
                }
                path
            }
            None => host.clone(),
        };
        entries.push((mount.mount_path.clone(), host));
    }
    Ok(Mounts::new(entries))
}

fn write_downward(
    facts: &Facts<'_>,
    container: &Container,
    dir: &Path,
    items: Option<&[k8s_openapi::api::core::v1::DownwardAPIVolumeFile]>,
    default_mode: i32,
) -> Result<(), String> {
    for item in items.unwrap_or_default() {
        let value = if let Some(field) = &item.field_ref {
            facts.field(field)?
        } else if let Some(resource) = &item.resource_field_ref {
            facts.resource(container, resource)?
        } else {
            continue;
        };
        write_file(
            &dir.join(safe_relative(&item.path)?),
            value.as_bytes(),
            item.mode.unwrap_or(default_mode),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts() -> Mounts {
        Mounts::new(vec![
            ("/etc/logpipe/".into(), PathBuf::from("/pod/volumes/config")),
            ("/var/log/pods".into(), PathBuf::from("/node/var/log/pods")),
            (
                "/var/lib/logpipe".into(),
                PathBuf::from("/node/var/lib/logpipe"),
            ),
            (
                "/var/lib/logpipe/tls".into(),
                PathBuf::from("/pod/volumes/tls"),
            ),
        ])
    }

    #[test]
    fn translates_paths_and_args() {
        let m = mounts();
        assert_eq!(
            m.translate("/etc/logpipe/config.yaml"),
            Some("/pod/volumes/config/config.yaml".into())
        );
        assert_eq!(
            m.translate("/etc/logpipe"),
            Some("/pod/volumes/config".into())
        );
        assert_eq!(m.translate("/etc/logpipex/a"), None);
        assert_eq!(
            m.translate("/var/lib/logpipe/tls/ca.crt"),
            Some("/pod/volumes/tls/ca.crt".into())
        );
        assert_eq!(
            m.translate_arg("--config=/etc/logpipe/c.yaml"),
            "--config=/pod/volumes/config/c.yaml"
        );
        assert_eq!(
            m.translate_arg("/etc/logpipe/c.yaml"),
            "/pod/volumes/config/c.yaml"
        );
        assert_eq!(m.translate_arg("--level=info"), "--level=info");
        assert_eq!(
            m.translate_or_rootfs("/var/lib/other/positions.json", Path::new("/pod/rootfs")),
            PathBuf::from("/pod/rootfs/var/lib/other/positions.json")
        );
        assert_eq!(
            m.translate_or_rootfs("/../../etc/passwd", Path::new("/pod/rootfs")),
            PathBuf::from("/pod/rootfs/etc/passwd")
        );
    }

    #[test]
    fn translates_config_documents() {
        let text = "# keep me\nloki:\n  tls: {caFile: /var/lib/logpipe/tls/ca.crt}\npositionsFile: \"/var/lib/logpipe/p.json\"\nrelabel: [{regex: /x}]\nother: /var/lib/logpipe-old/x\n";
        let out = mounts().translate_document(text).unwrap();
        assert!(out.starts_with("# keep me\n"), "{out}");
        let doc: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(doc["loki"]["tls"]["caFile"], "/pod/volumes/tls/ca.crt");
        assert_eq!(doc["positionsFile"], "/node/var/lib/logpipe/p.json");
        assert_eq!(doc["relabel"][0]["regex"], "/x");
        assert_eq!(doc["other"], "/var/lib/logpipe-old/x");
        assert_eq!(mounts().translate_document("a: /nothing/here\n"), None);
    }

    #[test]
    fn refuses_escapes() {
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert_eq!(
            safe_relative("/var/log/pods").unwrap(),
            PathBuf::from("var/log/pods")
        );
    }
}
