//! Images are local binaries: `<registry>/<path>/<name>:<tag>` runs
//! `<images dir>/<tag>/<name>`. Tests and the demo "publish a release" by copying the
//! built agent to `target/testbed/images/<tag>/logpipe-agent` (copy to a temporary name
//! and rename, so a starting pod never sees half a binary).
//!
//! An optional map file (`--image-map`, env `LOGPIPE_NODESIM_IMAGE_MAP`) overrides the
//! rule for exact image references, one per line: `IMAGE PATH` (or `IMAGE=PATH`), `#`
//! comments, relative paths from the map file's directory. It is read on every lookup,
//! so editing it needs no restart.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Size and mtime of a binary: a republished binary is a new version.
type Version = (u64, SystemTime);
/// Binary -> the version it was hashed at and its digest (None while hashing).
type Digests = HashMap<PathBuf, (Version, Option<String>)>;

/// Finds the binary of an image; remembers binary digests for `imageID`.
#[derive(Debug)]
pub struct Images {
    dir: PathBuf,
    map_file: Option<PathBuf>,
    digests: Arc<Mutex<Digests>>,
}

/// Name and tag of an image reference; `None` for references the rule cannot map
/// (digest only, bad characters).
pub fn name_and_tag(image: &str) -> Option<(&str, &str)> {
    let (without_digest, digest) = match image.split_once('@') {
        Some((reference, digest)) => (reference, Some(digest)),
        None => (image, None),
    };
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let (name, tag) = match last.split_once(':') {
        Some((name, tag)) => (name, tag),
        // A digest without a tag names no release directory.
        None if digest.is_some() => return None,
        None => (last, "latest"),
    };
    // Both become path components: refuse anything that could leave the images dir.
    let safe = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    (safe(name) && safe(tag)).then_some((name, tag))
}

impl Images {
    pub fn new(dir: PathBuf, map_file: Option<PathBuf>) -> Self {
        Self {
            dir,
            map_file,
            digests: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The executable for `image`, or the message a kubelet would show for a failed pull.
    pub fn resolve(&self, image: &str) -> Result<PathBuf, String> {
        if let Some(path) = self.mapped(image) {
            return if is_executable(&path) {
                Ok(path)
            } else {
                Err(pull_error(
                    image,
                    &format!(
                        "{} (from the image map) is not an executable file",
                        path.display()
                    ),
                ))
            };
        }
        let Some((name, tag)) = name_and_tag(image) else {
            return Err(pull_error(
                image,
                "the node simulator maps only <repo>/<name>:<tag> references (or exact entries of the image map)",
            ));
        };
        let path = self.dir.join(tag).join(name);
        if is_executable(&path) {
            Ok(path)
        } else {
            Err(pull_error(
                image,
                &format!(
                    "not found: no executable {} (publish the release by copying the binary there)",
                    path.display()
                ),
            ))
        }
    }

    fn mapped(&self, image: &str) -> Option<PathBuf> {
        let map_file = self.map_file.as_ref()?;
        let text = std::fs::read_to_string(map_file).ok()?;
        let base = map_file.parent().unwrap_or(Path::new("."));
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                l.split_once('=')
                    .or_else(|| l.split_once(char::is_whitespace))
            })
            .find(|(key, _)| key.trim() == image)
            .map(|(_, path)| base.join(path.trim()))
    }

    /// `<repo>@sha256:<digest of the binary>`, cached by size and mtime: republishing a
    /// tag changes the ID, as a new push of the same tag would. Never waits: hashing a
    /// debug agent (200+ MB) takes seconds, so it runs once per binary version on its own
    /// thread, and None means "not known yet, ask again".
    pub fn image_id(&self, image: &str, binary: &Path) -> Option<String> {
        let repo = image.split('@').next().unwrap_or(image);
        let repo = match repo.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repo,
        };
        let meta = std::fs::metadata(binary).ok()?;
        let version = (
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let key = binary.to_path_buf();
        let mut cache = self.digests.lock().ok()?;
        match cache.get(&key) {
            Some((v, digest)) if *v == version => {
                return digest.as_ref().map(|d| format!("{repo}@sha256:{d}"));
            }
            _ => {
                cache.insert(key.clone(), (version, None));
            }
        }
        drop(cache);
        let digests = Arc::clone(&self.digests);
        std::thread::spawn(move || {
            let digest = sha256_file(&key);
            if let Ok(mut cache) = digests.lock()
                && let Some(entry) = cache.get_mut(&key)
                && entry.0 == version
            {
                match digest {
                    Some(d) => entry.1 = Some(d),
                    // Unreadable now: forget it so the next lookup tries again.
                    None => {
                        cache.remove(&key);
                    }
                }
            }
        });
        None
    }
}

fn sha256_file(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).ok()?;
    Some(hex::encode(hasher.finalize()))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pull_error(image: &str, why: &str) -> String {
    format!(
        "Failed to pull image \"{image}\": rpc error: code = NotFound desc = failed to pull and unpack image \"{image}\": {why}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tags() {
        assert_eq!(
            name_and_tag("ghcr.io/logpipe/logpipe-agent:v0.2.0"),
            Some(("logpipe-agent", "v0.2.0"))
        );
        assert_eq!(
            name_and_tag("localhost:5000/logpipe-agent:dev"),
            Some(("logpipe-agent", "dev"))
        );
        assert_eq!(
            name_and_tag("logpipe-agent"),
            Some(("logpipe-agent", "latest"))
        );
        assert_eq!(
            name_and_tag("x/logpipe-agent:v1@sha256:abc"),
            Some(("logpipe-agent", "v1"))
        );
        assert_eq!(name_and_tag("x/logpipe-agent@sha256:abc"), None);
        assert_eq!(name_and_tag("x/logpipe-agent:.."), None);
    }

    #[test]
    fn resolves_published_tags_only() {
        let dir = std::env::temp_dir().join(format!("nodesim-images-{}", std::process::id()));
        let bin = dir.join("v1").join("logpipe-agent");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let map = dir.join("map");
        std::fs::write(
            &map,
            "# overrides\nexample.com/custom:1 = v1/logpipe-agent\n",
        )
        .unwrap();
        let images = Images::new(dir.clone(), Some(map));
        assert_eq!(images.resolve("reg.invalid/logpipe-agent:v1").unwrap(), bin);
        let err = images.resolve("reg.invalid/logpipe-agent:v2").unwrap_err();
        assert!(err.starts_with("Failed to pull image"), "{err}");
        assert_eq!(
            images.resolve("example.com/custom:1").unwrap(),
            dir.join("v1/logpipe-agent")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
