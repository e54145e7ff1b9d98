#!/usr/bin/env bash
# make images: the operator and agent images, built without a Docker daemon.
#
#   tests/images/build.sh [agent|operator]...      (default: both)
#
# The images are what operator/Dockerfile and agent/Dockerfile build on a machine with
# Docker, assembled here with buildah from scratch (no daemon, no image pulls, no
# registry): the release binary (debug info stripped, symbols kept), the shared libraries
# `ldd` lists, taken from this Debian 12 host (the glibc of gcr.io/distroless/cc-debian12),
# /etc/passwd and /etc/group with root and nonroot (65532), CA certificates, /tmp, and the
# dpkg records distroless writes so image scanners see the Debian package versions.
#
# Output: target/images/logpipe-<name>.tar (under $CARGO_TARGET_DIR if set), a
# docker-archive (`docker load -i`, `podman load -i`) tagged
# $IMAGE_REPO/logpipe-<name>:$IMAGE_TAG, reproducible: the same binary and commit give the
# same bytes.
#
# Environment: IMAGE_REPO (default ghcr.io/logpipe), IMAGE_TAG (default the workspace
# version), SOURCE_DATE_EPOCH (default the last commit's time: file and image timestamps).
# Needs: root (buildah's vfs storage as root; no user namespaces needed), buildah, cargo,
# ldd, objcopy, dpkg-query, /etc/ssl/certs/ca-certificates.crt.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
out=$target/images
CARGO=${CARGO:-cargo}

die() { echo "images: $*" >&2; exit 1; }

need() { # need TOOL HOW-TO-GET
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"
}
need buildah "apt-get install -y buildah (Debian 12 has buildah 1.28)"
need "$CARGO" "install Rust 1.95 (see README)"
need ldd "apt-get install -y libc-bin"
need objcopy "apt-get install -y binutils"
need dpkg-query "run on Debian 12 (the libraries come from Debian's libc6 and libgcc-s1)"
[ -r /etc/ssl/certs/ca-certificates.crt ] ||
  die "/etc/ssl/certs/ca-certificates.crt missing: apt-get install -y ca-certificates"
[ "$(id -u)" = 0 ] ||
  die "run as root (sudo make images): buildah's vfs storage keeps file owners (uid 0, 65532) only as root"
. /etc/os-release
[ "${ID:-}" = debian ] && [ "${VERSION_ID:-}" = 12 ] ||
  die "this host is ${PRETTY_NAME:-unknown}: the libraries must come from Debian 12 to match gcr.io/distroless/cc-debian12 and the rust:1.95-bookworm build"
[ "$(uname -m)" = x86_64 ] || die "only linux/amd64 is assembled here (host is $(uname -m))"

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(operator agent)
for n in "${names[@]}"; do
  case $n in agent | operator) ;; *) die "unknown image '$n' (known: agent operator)" ;; esac
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
[ -n "$version" ] || die "no version in $repo/Cargo.toml [workspace.package]"
IMAGE_REPO=${IMAGE_REPO:-ghcr.io/logpipe}
IMAGE_TAG=${IMAGE_TAG:-$version}
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

# One cargo invocation for every crate: shared dependencies are built once.
pkgs=()
for n in "${names[@]}"; do pkgs+=(-p "logpipe-$n" --bin "logpipe-$n"); done
echo "images: cargo build --release --locked ${pkgs[*]}"
(cd "$repo" && "$CARGO" build --release --locked "${pkgs[@]}")

# buildah's own storage, under target/ and removed at the end: nothing is left in
# /var/lib/containers. vfs needs no overlay mounts; chroot isolation needs no namespaces.
store=$out/.buildah
export BUILDAH_ISOLATION=chroot
bh() { buildah --storage-driver vfs --root "$store/root" --runroot "$store/run" "$@"; }
cleanup() {
  bh rm --all >/dev/null 2>&1 || true
  rm -rf "$store" "$out"/rootfs-*
}
trap cleanup EXIT
mkdir -p "$out"

# The distroless-like root of one image, in $1.
assemble_root() {
  local root=$1 bin=$2 name=$3
  rm -rf "$root"
  mkdir -p "$root"/{usr/local/bin,etc/ssl/certs,tmp,root,home/nonroot,var/lib/dpkg/status.d}
  objcopy --strip-debug "$bin" "$root/usr/local/bin/$name"
  chmod 0755 "$root/usr/local/bin/$name"

  # Every library the binary loads, and its program interpreter, at the path ldd reports
  # (regular files: no symlink can point outside the image).
  local libs lib pkg
  libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
  [ -n "$libs" ] || die "ldd lists no library for $bin (a static binary needs no root of libraries: adjust this script)"
  local pkgs_of_libs=()
  for lib in $libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
    chmod 0755 "$root$lib"
    pkg=$( (dpkg -S "$lib" || dpkg -S "$(readlink -f "$lib")") 2>/dev/null | head -1 | cut -d: -f1) ||
      die "$lib (needed by $bin) belongs to no Debian package: the image takes its libraries from Debian 12 only"
    pkgs_of_libs+=("$pkg")
  done

  # What distroless records: dpkg status stanzas and copyright files of the packages whose
  # files are in the image (glibc and libgcc are LGPL/GPL-with-exception: ship the notices).
  for pkg in $(printf '%s\n' "${pkgs_of_libs[@]}" ca-certificates | sort -u); do
    dpkg-query -s "$pkg" >"$root/var/lib/dpkg/status.d/$pkg" ||
      die "dpkg-query -s $pkg failed"
    if [ -r "/usr/share/doc/$pkg/copyright" ]; then
      mkdir -p "$root/usr/share/doc/$pkg"
      cp "/usr/share/doc/$pkg/copyright" "$root/usr/share/doc/$pkg/copyright"
    fi
  done

  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
  cp -L /etc/os-release "$root/etc/os-release"

  chmod 0755 "$root" "$root"/etc "$root"/usr "$root"/var
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root" "$root/home/nonroot"
  chown -R 0:0 "$root"
  chown 65532:65532 "$root/home/nonroot"
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

for n in "${names[@]}"; do
  name=logpipe-$n
  ref=$IMAGE_REPO/$name:$IMAGE_TAG
  archive=$out/$name.tar
  case $n in
    operator)
      user=65532:65532 port=8080
      description="Kubernetes operator: reconciles LogPipeline resources into verified log-agent DaemonSets"
      ;;
    agent)
      # uid 0 with every capability dropped, read-only root filesystem: see agent/Dockerfile.
      user=0:0 port=12345
      description="Node log agent: tails container logs, labels them, ships them to Grafana Loki, loses nothing"
      ;;
  esac
  root=$out/rootfs-$n
  assemble_root "$root" "$target/release/$name" "$name"

  ctr=$(bh from --name "$name-build" scratch)
  mnt=$(bh mount "$ctr")
  cp -a "$root"/. "$mnt"/
  bh umount "$ctr" >/dev/null
  bh config \
    --os linux --arch amd64 \
    --entrypoint "[\"/usr/local/bin/$name\"]" --cmd '' \
    --user "$user" --workingdir / --port "$port/tcp" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label "org.opencontainers.image.title=$name" \
    --label "org.opencontainers.image.description=$description" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.created=$created" \
    --label "org.opencontainers.image.source=https://github.com/logpipe/logpipe" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    --label "org.opencontainers.image.vendor=logpipe" \
    --created-by "tests/images/build.sh (buildah from scratch; equivalent of $n/Dockerfile)" \
    "$ctr"
  rm -f "$archive"
  bh commit --quiet --format oci --timestamp "$SOURCE_DATE_EPOCH" --rm \
    "$ctr" "docker-archive:$archive:$ref" >/dev/null
  rm -rf "$root"
  size=$(stat -c %s "$archive")
  gz=$(gzip -c "$archive" | wc -c)
  awk -v r="$ref" -v a="${archive#"$PWD"/}" -v s="$size" -v g="$gz" \
    'BEGIN { printf "images: %s -> %s (%.1f MiB, %.1f MiB gzipped)\n", r, a, s / 1048576, g / 1048576 }'
done
