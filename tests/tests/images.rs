//! The container images of `make images` (tests/images/build.sh, the daemonless
//! equivalent of operator/Dockerfile and agent/Dockerfile). Run by `make images-test`,
//! which builds them first; as root (the images' roots are entered with `chroot`).
//!
//! For each archive: the docker-archive is well formed (config and layer digests match
//! their names and the config's diff_ids), the config has the entrypoint, user, port and
//! labels the Dockerfile sets, the layer holds the binary, every library `ldd` reports and
//! a distroless-like root (passwd, CA certificates, /tmp, no shell), and the binary runs
//! from the unpacked root, both through the layer's own dynamic loader and chrooted as the
//! image's user: the operator renders the ops example, the agent serves its metrics.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use logpipe_e2e::{Testbed, repo_root, store, target_dir};
use serde_json::Value;
use sha2::{Digest, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const LOADER: &str = "lib64/ld-linux-x86-64.so.2";

fn need_tool(tool: &str, how: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` is needed by this test and not found: {how}"
    );
}

fn need_root() {
    let uid = rustix::process::geteuid();
    assert!(
        uid.is_root(),
        "this test chroots into the images' roots and must run as root: `sudo make images-test`"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

/// One entry of `tar -tv --numeric-owner`: mode string, owner "uid/gid", size.
#[derive(Debug)]
struct Entry {
    mode: String,
    owner: String,
    size: u64,
}

struct Image {
    name: String,
    config: Value,
    repo_tags: Vec<String>,
    /// Layer entries by path, without a leading `./` or a trailing `/`.
    entries: BTreeMap<String, Entry>,
    root: PathBuf,
    archive_bytes: u64,
    layer_bytes: u64,
}

impl Image {
    fn container_config(&self) -> &Value {
        &self.config["config"]
    }

    fn entry(&self, path: &str) -> &Entry {
        self.entries.get(path).unwrap_or_else(|| {
            panic!(
                "{}: the layer has no {path} (it has: {:?})",
                self.name,
                self.entries.keys().collect::<Vec<_>>()
            )
        })
    }

    fn binary(&self) -> String {
        format!("/usr/local/bin/{}", self.name)
    }

    /// The image's environment (config Env), as a chrooted process gets it from a runtime.
    fn env(&self) -> Vec<(String, String)> {
        self.container_config()["Env"]
            .as_array()
            .map(|env| {
                env.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `chroot --userspec=<image user> <root> <entrypoint> args...`, with the image's env.
    fn chroot(&self, args: &[&str]) -> Command {
        let user = self.container_config()["User"].as_str().unwrap_or("0:0");
        let mut cmd = Command::new("chroot");
        cmd.arg(format!("--userspec={user}"))
            .arg(&self.root)
            .arg(self.binary())
            .args(args)
            .env_clear()
            .envs(self.env())
            .current_dir("/");
        cmd
    }
}

/// Unpacks target/images/logpipe-<name>.tar under target/images/test/<name> and checks
/// the archive's structure and digests.
fn unpack(name: &str) -> Image {
    need_tool("tar", "apt-get install -y tar");
    let images = target_dir().join("images");
    let name = format!("logpipe-{name}");
    let archive = images.join(format!("{name}.tar"));
    assert!(
        archive.is_file(),
        "{} is missing: run `make images-test` (it runs `make images` first), as root",
        archive.display()
    );
    let work = images.join("test").join(&name);
    if work.exists() {
        std::fs::remove_dir_all(&work).unwrap();
    }
    let unpacked = work.join("archive");
    let root = work.join("root");
    std::fs::create_dir_all(&unpacked).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&unpacked));

    let manifest: Value = serde_json::from_slice(
        &std::fs::read(unpacked.join("manifest.json")).unwrap_or_else(|e| {
            panic!(
                "{}: no manifest.json ({e}): not a docker-archive",
                archive.display()
            )
        }),
    )
    .unwrap();
    let entries = manifest.as_array().expect("manifest.json is a list");
    assert_eq!(
        entries.len(),
        1,
        "{name}: one image per archive: {manifest}"
    );
    let entry = &entries[0];
    let config_file = entry["Config"].as_str().expect("manifest Config");
    let config_hex = config_file
        .strip_suffix(".json")
        .expect("config file is <sha256>.json");
    assert_eq!(
        sha256_file(&unpacked.join(config_file)),
        config_hex,
        "{name}: the config's digest does not match its name"
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(unpacked.join(config_file)).unwrap()).unwrap();
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("config rootfs.diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff_id is a string"))
        .collect();
    let layers: Vec<&str> = entry["Layers"]
        .as_array()
        .expect("manifest Layers")
        .iter()
        .map(|l| l.as_str().expect("layer is a path"))
        .collect();
    assert_eq!(
        layers.len(),
        diff_ids.len(),
        "{name}: manifest layers and config diff_ids differ in number"
    );
    assert_eq!(
        layers.len(),
        1,
        "{name}: expected one layer (FROM scratch, one copy)"
    );
    let mut listing = BTreeMap::new();
    let mut layer_bytes = 0;
    for (layer, diff_id) in layers.iter().zip(&diff_ids) {
        let path = unpacked.join(layer);
        let digest = format!("sha256:{}", sha256_file(&path));
        assert_eq!(
            &digest, diff_id,
            "{name}: layer {layer} does not match the config's diff_id"
        );
        layer_bytes += std::fs::metadata(&path).unwrap().len();
        let list = run(Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(&path));
        for line in String::from_utf8(list.stdout).unwrap().lines() {
            // -rwxr-xr-x 0/0 18798312 2026-11-24 21:40 usr/local/bin/logpipe-agent
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(
                fields.len() >= 6,
                "{name}: unexpected tar listing line {line:?}"
            );
            let path = fields[5..].join(" ");
            let path = path.split(" -> ").next().unwrap_or_default();
            let path = path
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string();
            assert!(
                !path.contains(".wh."),
                "{name}: whiteout {path} in a FROM-scratch layer"
            );
            listing.insert(
                path,
                Entry {
                    mode: fields[0].to_string(),
                    owner: fields[1].to_string(),
                    size: fields[2].parse().unwrap_or(0),
                },
            );
        }
        run(Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&path)
            .arg("-C")
            .arg(&root));
    }
    let repo_tags = entry["RepoTags"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    Image {
        name,
        config,
        repo_tags,
        entries: listing,
        root,
        archive_bytes: std::fs::metadata(&archive).unwrap().len(),
        layer_bytes,
    }
}

/// The config the Dockerfile sets: entrypoint, user, port, labels, platform.
fn check_config(image: &Image, user: &str, port: u16) {
    let name = &image.name;
    let tag = std::env::var("IMAGE_TAG").unwrap_or_else(|_| VERSION.to_string());
    assert!(
        image
            .repo_tags
            .iter()
            .any(|t| t.ends_with(&format!("/{name}:{tag}"))),
        "{name}: archive tags {:?} lack <repo>/{name}:{tag} (docker load would leave it untagged)",
        image.repo_tags
    );
    assert_eq!(image.config["os"], "linux", "{name}: os");
    assert_eq!(
        image.config["architecture"], "amd64",
        "{name}: architecture"
    );
    let c = image.container_config();
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!([image.binary()]),
        "{name}: entrypoint"
    );
    assert!(
        c["Cmd"].is_null() || c["Cmd"].as_array().is_some_and(Vec::is_empty),
        "{name}: no default command expected, got {}",
        c["Cmd"]
    );
    assert_eq!(c["User"], user, "{name}: user");
    let ports: Vec<&String> = c["ExposedPorts"]
        .as_object()
        .map(|p| p.keys().collect())
        .unwrap_or_default();
    assert_eq!(ports, [&format!("{port}/tcp")], "{name}: exposed ports");
    let label = |key: &str| {
        c["Labels"][format!("org.opencontainers.image.{key}")]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no label org.opencontainers.image.{key}"))
            .to_string()
    };
    assert_eq!(label("title"), *name);
    assert_eq!(label("version"), VERSION);
    assert_eq!(label("licenses"), "Apache-2.0");
    assert!(
        label("source").starts_with("https://"),
        "{name}: source label"
    );
    assert!(!label("revision").is_empty(), "{name}: revision label");
    assert!(
        !label("description").is_empty(),
        "{name}: description label"
    );
    assert!(
        label("created").ends_with('Z'),
        "{name}: created label is RFC 3339 UTC"
    );
    assert!(
        image
            .env()
            .iter()
            .any(|(k, v)| k == "SSL_CERT_FILE" && v == "/etc/ssl/certs/ca-certificates.crt"),
        "{name}: SSL_CERT_FILE"
    );
}

/// A distroless-like root: the binary, its libraries, users, CA certificates, /tmp, and
/// nothing to run a shell with.
fn check_root(image: &Image) {
    let name = &image.name;
    let bin = image.entry(image.binary().trim_start_matches('/'));
    assert_eq!(bin.mode, "-rwxr-xr-x", "{name}: binary mode");
    assert_eq!(bin.owner, "0/0", "{name}: binary owner");
    assert!(bin.size > 1_000_000, "{name}: binary is {} bytes", bin.size);
    assert_eq!(image.entry("tmp").mode, "drwxrwxrwt", "{name}: /tmp mode");
    assert_eq!(image.entry("home/nonroot").owner, "65532/65532");
    for (path, entry) in &image.entries {
        assert!(
            !entry.mode.starts_with('l') && !entry.mode.starts_with('h'),
            "{name}: {path} is a link ({}); the image has regular files only",
            entry.mode
        );
        let special =
            entry.mode.chars().nth(3) == Some('s') || entry.mode.chars().nth(6) == Some('s');
        assert!(!special, "{name}: {path} is setuid/setgid ({})", entry.mode);
    }
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        assert!(
            !image.entries.contains_key(shell),
            "{name}: {shell} in a distroless image"
        );
    }

    let read = |path: &str| {
        std::fs::read_to_string(image.root.join(path))
            .unwrap_or_else(|e| panic!("{name}: read /{path}: {e}"))
    };
    let passwd = read("etc/passwd");
    assert!(passwd.contains("root:x:0:0:"), "{name}: passwd: {passwd}");
    assert!(
        passwd.contains("nonroot:x:65532:65532:"),
        "{name}: passwd: {passwd}"
    );
    assert!(read("etc/group").contains("nonroot:x:65532:"));
    let certs = read("etc/ssl/certs/ca-certificates.crt");
    let count = certs.matches("BEGIN CERTIFICATE").count();
    assert!(count > 100, "{name}: only {count} CA certificates");
    for pkg in ["libc6", "libgcc-s1", "ca-certificates"] {
        let status = read(&format!("var/lib/dpkg/status.d/{pkg}"));
        assert!(
            status.contains(&format!("Package: {pkg}\n")) && status.contains("Version: "),
            "{name}: dpkg record of {pkg} (what image scanners read): {status}"
        );
        assert!(
            image
                .root
                .join(format!("usr/share/doc/{pkg}/copyright"))
                .is_file(),
            "{name}: copyright notice of {pkg}"
        );
    }

    // Every library the dynamic linker resolves (and the linker itself), inside the image.
    need_tool("ldd", "apt-get install -y libc-bin");
    let binary = image.root.join(image.binary().trim_start_matches('/'));
    let ldd = run(Command::new("ldd").arg(&binary));
    let ldd = String::from_utf8(ldd.stdout).unwrap();
    let mut libs = Vec::new();
    for line in ldd.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "=>", path, ..] if path.starts_with('/') => libs.push(path.to_string()),
            [path, ..] if path.starts_with('/') => libs.push(path.to_string()),
            [vdso, ..] if vdso.starts_with("linux-vdso") => {}
            _ => panic!("{name}: unexpected ldd line {line:?} (a library not found?)\n{ldd}"),
        }
    }
    assert!(
        libs.iter().any(|l| l.ends_with("/libc.so.6")) && libs.iter().any(|l| l.ends_with(LOADER)),
        "{name}: ldd lists no libc or no loader:\n{ldd}"
    );
    for lib in &libs {
        let entry = image.entry(lib.trim_start_matches('/'));
        assert!(entry.mode.starts_with('-'), "{name}: {lib} is not a file");
    }
}

/// The binary runs from the unpacked root: through the layer's own loader and libraries
/// (host independent), then chrooted as the image's user.
fn check_runs(image: &Image, usage: &str) {
    let name = &image.name;
    let root = &image.root;
    let loader = run(Command::new(root.join(LOADER))
        .arg("--inhibit-cache")
        .arg("--library-path")
        .arg(root.join("lib/x86_64-linux-gnu"))
        .arg(root.join(image.binary().trim_start_matches('/')))
        .arg("--help"));
    let help = String::from_utf8_lossy(&loader.stdout);
    assert!(
        help.contains(usage),
        "{name} --help through the layer's loader lacks {usage:?}:\n{help}"
    );

    need_root();
    need_tool("chroot", "apt-get install -y coreutils");
    let out = run(&mut image.chroot(&["--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains(usage),
        "{name} --help chrooted lacks {usage:?}:\n{help}"
    );
    let out = run(&mut image.chroot(&["--version"]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{name} {VERSION}"),
        "{name} --version"
    );
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

fn report(image: &Image) {
    eprintln!(
        "{}: archive {:.1} MiB, layer {:.1} MiB, tags {:?}",
        image.name,
        image.archive_bytes as f64 / 1_048_576.0,
        image.layer_bytes as f64 / 1_048_576.0,
        image.repo_tags
    );
}

#[test]
fn operator_image() {
    let image = unpack("operator");
    report(&image);
    check_config(&image, "65532:65532", 8080);
    check_root(&image);
    check_runs(&image, "Usage: logpipe-operator");

    // Real work as nonroot inside the image: render the ops example.
    let example = image.root.join("tmp/ops.yaml");
    std::fs::copy(repo_root().join("examples/ops.yaml"), &example).unwrap();
    let out = run(&mut image.chroot(&["render", "-f", "/tmp/ops.yaml"]));
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(
        rendered.contains("kind: DaemonSet")
            && rendered.contains(&format!("image: ghcr.io/logpipe/logpipe-agent:{VERSION}")),
        "render in the operator image printed no agent DaemonSet:\n{rendered}"
    );
}

#[test]
fn agent_image() {
    let image = unpack("agent");
    report(&image);
    check_config(&image, "0:0", 12345);
    check_root(&image);
    check_runs(&image, "Usage: logpipe-agent");
    run_like_the_daemonset(&image);
}

/// The agent in its image under the DaemonSet's security context (operator/src/desired/
/// daemonset.rs), as far as a test without a container runtime can make it: uid 0 with no
/// capability but CAP_SYS_CHROOT (needed to enter the root; it grants no file access),
/// no_new_privs, read-only root filesystem, a tmpfs /tmp, the root-owned pod log tree
/// (dirs 0750, files 0640) mounted read-only at /var/log/pods, a root-owned positions
/// directory at /var/lib/logpipe, the config read-only at /etc/logpipe/config. It reads
/// the log file, pushes to the test bed's real store and saves its positions after the
/// acknowledgement: what the Dockerfile says uid 0 without DAC capabilities is enough for.
fn run_like_the_daemonset(image: &Image) {
    need_tool("unshare", "apt-get install -y util-linux");
    need_tool("setpriv", "apt-get install -y util-linux");
    need_tool("mount", "apt-get install -y mount");
    let host = image.root.parent().unwrap().join("host");
    let pod_dir = host.join("pods/default_demo_0000-1111/app");
    let positions = host.join("positions");
    let config = host.join("config");
    for dir in [&pod_dir, &positions, &config] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let cri: String = (0..3)
        .map(|i| format!("2026-01-01T00:00:0{i}.000000000Z stdout F line {i} of the image test\n"))
        .collect();
    std::fs::write(pod_dir.join("0.log"), cri).unwrap();
    run(Command::new("chown").args(["-R", "0:0"]).arg(&host));
    run(Command::new("chmod")
        .args(["-R", "u=rwX,g=rX,o="])
        .arg(host.join("pods")));
    run(Command::new("chmod").arg("0640").arg(pod_dir.join("0.log")));
    run(Command::new("chmod").arg("0700").arg(&positions));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let testbed = runtime
        .block_on(Testbed::ensure(&["ops"]))
        .unwrap_or_else(|e| panic!("{e}"));
    let tenant = store::unique_tenant();
    let port = logpipe_e2e::free_port().unwrap();
    std::fs::write(
        config.join("config.yaml"),
        format!(
            "loki:\n  url: {}\n  tenant: \"{tenant}\"\n  \
             batchWait: 100ms\n\
             logRoot: /var/log/pods\npositionsFile: /var/lib/logpipe/positions.json\n\
             listen: 127.0.0.1:{port}\npipeline:\n- cri: {{}}\n",
            testbed.push_url()
        ),
    )
    .unwrap();

    // Mount points the runtime would create, made before the root turns read-only.
    for dir in ["var/log/pods", "var/lib/logpipe", "etc/logpipe/config"] {
        std::fs::create_dir_all(image.root.join(dir)).unwrap();
    }
    let script = r#"set -eu
r=$1 host=$2
ro_bind() { mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; }
mount --make-rprivate /
mount --bind "$r" "$r"
ro_bind "$host/pods" "$r/var/log/pods"
mount --bind "$host/positions" "$r/var/lib/logpipe"
ro_bind "$host/config" "$r/etc/logpipe/config"
mount -t tmpfs -o mode=1777,size=16m tmpfs "$r/tmp"
mount -o remount,bind,ro "$r"
if touch "$r/usr/local/bin/writable" 2>/dev/null; then echo "root is writable" >&2; exit 1; fi
exec setpriv --reuid=0 --regid=0 --clear-groups --no-new-privs \
  --securebits +noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked \
  --bounding-set -all,+sys_chroot --inh-caps -all,+sys_chroot --ambient-caps -all,+sys_chroot \
  chroot "$r" /usr/local/bin/logpipe-agent \
  --config /etc/logpipe/config/config.yaml --node-name images-test --log-format text
"#;
    let log = host.join("agent.log");
    let mut child = Command::new("unshare")
        .args(["--mount", "--", "sh", "-c", script, "sandbox"])
        .arg(&image.root)
        .arg(&host)
        .env_clear()
        .envs(image.env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the agent in its image root");
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = String::new();
    let mut caps = String::new();
    let done = |m: &str| {
        counter(m, "promtail_sent_entries_total") >= 3.0
            && counter(m, "logpipe_positions_commits_total") >= 1.0
    };
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the agent exited ({status}) in its image:\n{}", agent_log());
        }
        if caps.is_empty() {
            caps = agent_caps(child.id());
        }
        if let Some(body) = http_get(port, "/metrics").filter(|b| b.starts_with("HTTP/1.1 200")) {
            metrics = body;
            if done(&metrics) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        done(&metrics),
        "the agent in its image did not ship the 3 lines of its log file and save its \
         positions within 30 s (metrics on 127.0.0.1:{port}):\n{metrics}\nagent log:\n{}",
        agent_log()
    );
    // The lines are dated 2026-01-01: ask from the day before.
    let since = chrono_ns("2025-12-31T00:00:00Z");
    let stored = runtime
        .block_on(store::wait_for(
            &testbed.store_url,
            &tenant,
            "{namespace=\"default\", pod=\"demo\"}",
            since,
            Duration::from_secs(30),
            |s| store::count(s) >= 3,
        ))
        .unwrap();
    let lines: Vec<&str> = stored
        .iter()
        .flat_map(|s| s.entries.iter().map(|(_, l)| l.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            "line 0 of the image test",
            "line 1 of the image test",
            "line 2 of the image test"
        ],
        "the store under tenant {tenant}"
    );
    assert!(
        positions.join("positions.json").is_file(),
        "no positions file in the positions directory: {:?}",
        std::fs::read_dir(&positions).map(|d| d.count())
    );
    // CapEff of the agent: CAP_SYS_CHROOT (bit 18) at most, never a DAC capability.
    let eff = u64::from_str_radix(caps.trim(), 16)
        .unwrap_or_else(|_| panic!("could not read the agent's CapEff: {caps:?}"));
    eprintln!(
        "logpipe-agent: shipped {} lines, found in the store, saved positions, CapEff {eff:#x}",
        counter(&metrics, "promtail_sent_entries_total"),
    );
    assert_eq!(
        eff & !(1 << 18),
        0,
        "the agent ran with capabilities {eff:#x}: the test meant to drop all but CAP_SYS_CHROOT"
    );
}

/// CapEff (hex) of the agent process: the deepest descendant of `pid` (unshare -> sh ->
/// setpriv -> chroot are replaced by exec, so it is `pid` itself or its child).
fn agent_caps(pid: u32) -> String {
    let mut pid = pid.to_string();
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        match children.split_whitespace().next() {
            Some(child) => pid = child.to_string(),
            None => break,
        }
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if !exe.ends_with("usr/local/bin/logpipe-agent") {
        return String::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap_or_default()
        .to_string()
}

fn chrono_ns(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .unwrap_or_default()
}

/// Sum of a metric's samples over all label sets in a Prometheus text exposition.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
