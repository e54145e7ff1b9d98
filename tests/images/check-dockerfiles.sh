#!/usr/bin/env bash
# make images-test, second half: operator/Dockerfile and agent/Dockerfile themselves, built
# offline with `buildah bud` (no daemon, no pulls), and their images compared with the
# ones `make images` assembled (same user, entrypoint, exposed ports, OCI labels).
#
# The two base images are stand-ins, as no registry is reachable: rust:1.95-bookworm is a
# stub holding sh, objcopy and a `cargo` that checks the build context (the workspace,
# without .git or target/, per .dockerignore) and copies the release binary built by
# `make images`; gcr.io/distroless/cc-debian12 is the root layer of the `make images`
# agent image, without its config. What is checked: the Dockerfiles' syntax, ARGs, both
# stages, the cache mounts, COPY --from, .dockerignore, USER/EXPOSE/ENTRYPOINT/LABEL.
# What is not: the real base images and the real `cargo build` (a machine with Docker).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
images=$target/images
w=$images/.dockerfile-check

die() { echo "check-dockerfiles: $*" >&2; exit 1; }
command -v buildah >/dev/null || die "'buildah' not found: apt-get install -y buildah"
command -v python3 >/dev/null || die "'python3' not found: apt-get install -y python3"
[ "$(id -u)" = 0 ] || die "run as root (sudo make images-test)"
for n in agent operator; do
  [ -f "$images/logpipe-$n.tar" ] || die "$images/logpipe-$n.tar missing: run make images"
  [ -x "$target/release/logpipe-$n" ] || die "$target/release/logpipe-$n missing: run make images"
done

export BUILDAH_ISOLATION=chroot
bh() { buildah --storage-driver vfs --root "$w/store" --runroot "$w/run" "$@"; }
cleanup() {
  bh rm --all >/dev/null 2>&1 || true
  rm -rf "$w"
}
trap cleanup EXIT
rm -rf "$w"
mkdir -p "$w"

# Stand-in for rust:1.95-bookworm.
stub=$w/rust-stub
mkdir -p "$stub"/{usr/bin,usr/local/cargo/bin,prebuilt,tmp}
ln -s usr/bin "$stub/bin"
tools=(/bin/dash /bin/cp /bin/mkdir /usr/bin/objcopy)
for t in "${tools[@]}"; do cp -L "$t" "$stub/usr/bin/"; done
ln -s dash "$stub/usr/bin/sh"
for lib in $(ldd "${tools[@]}" | awk '$2 == "=>" { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u); do
  mkdir -p "$stub$(dirname "$lib")"
  cp -L "$lib" "$stub$lib"
done
cp "$target"/release/logpipe-{agent,operator} "$stub/prebuilt/"
cat >"$stub/usr/local/cargo/bin/cargo" <<'EOF'
#!/bin/sh
# Stub: checks the build context, then "builds" by copying the prebuilt binary.
set -e
echo "stub cargo $*" >&2
[ "$1 $2 $3" = "build --release --locked" ] || { echo "stub cargo: unexpected arguments: $*" >&2; exit 1; }
pkg=
while [ $# -gt 0 ]; do [ "$1" = -p ] && pkg=$2; shift; done
for f in Cargo.toml Cargo.lock agent/Cargo.toml operator/Cargo.toml tests/Cargo.toml; do
  [ -f "$f" ] || { echo "stub cargo: $f not in the build context" >&2; exit 1; }
done
[ ! -e .git ] || { echo "stub cargo: .git in the build context (.dockerignore)" >&2; exit 1; }
[ ! -e target/release/.fingerprint ] || { echo "stub cargo: target/ came from the build context (.dockerignore)" >&2; exit 1; }
mkdir -p target/release
cp "/prebuilt/$pkg" "target/release/$pkg"
EOF
chmod 0755 "$stub/usr/local/cargo/bin/cargo"
ctr=$(bh from scratch)
cp -a "$stub"/. "$(bh mount "$ctr")"/
bh umount "$ctr" >/dev/null
bh config --env PATH=/usr/local/cargo/bin:/usr/bin:/bin "$ctr"
bh commit --quiet --rm "$ctr" localhost/rust-stub >/dev/null

# Stand-in for gcr.io/distroless/cc-debian12: the agent image's root layer, no config.
mkdir -p "$w/agent-archive"
tar -xf "$images/logpipe-agent.tar" -C "$w/agent-archive"
layer=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["Layers"][0])' \
  "$w/agent-archive/manifest.json")
ctr=$(bh from scratch)
bh add "$ctr" "$w/agent-archive/$layer" / >/dev/null
bh commit --quiet --rm "$ctr" localhost/distroless-stub >/dev/null

for n in operator agent; do
  echo "check-dockerfiles: buildah bud -f $n/Dockerfile (stub bases)"
  bh bud --quiet --layers=false --pull=never \
    --build-arg RUST_IMAGE=localhost/rust-stub \
    --build-arg BASE_IMAGE=localhost/distroless-stub \
    --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)" \
    -f "$repo/$n/Dockerfile" -t "localhost/dockerfile-$n" "$repo" >/dev/null
  bh inspect --type image "localhost/dockerfile-$n" >"$w/dockerfile-$n.json"
  mkdir -p "$w/made-$n"
  tar -xf "$images/logpipe-$n.tar" -C "$w/made-$n"
  python3 - "$n" "$w/dockerfile-$n.json" "$w/made-$n" <<'EOF'
import json, os, sys
name, inspect, made = sys.argv[1:]
df = json.load(open(inspect))["OCIv1"]["config"]
cfg_file = json.load(open(os.path.join(made, "manifest.json")))[0]["Config"]
mk = json.load(open(os.path.join(made, cfg_file)))["config"]
bad = []
for key in ("User", "Entrypoint", "ExposedPorts"):
    if df.get(key) != mk.get(key):
        bad.append(f"{key}: Dockerfile {df.get(key)!r}, make images {mk.get(key)!r}")
for key, value in sorted(mk.get("Labels", {}).items()):
    if key.startswith("org.opencontainers.image.") and key.split(".")[-1] not in ("created", "revision"):
        if df.get("Labels", {}).get(key) != value:
            bad.append(f"label {key}: Dockerfile {df.get('Labels', {}).get(key)!r}, make images {value!r}")
if bad:
    sys.exit(f"check-dockerfiles: {name}/Dockerfile and make images differ:\n  " + "\n  ".join(bad))
print(f"check-dockerfiles: {name}/Dockerfile builds; user {df['User']}, entrypoint {df['Entrypoint']}, "
      f"ports {sorted(df['ExposedPorts'])}, labels as make images")
EOF
done
