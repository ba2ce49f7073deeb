# SPDX-License-Identifier: MIT
# Shared helpers of build/boot-tests (sourced, not run). Everything these helpers fetch comes
# from Debian's archive through apt, into a private apt state under build/out/apt, so the
# host's own apt configuration and dpkg database are never changed (foreign architectures
# included: the arm64 kernel and busybox are downloaded, never installed).

# Where downloads and built images live (gitignored).
# Absolute, because the helpers change directory.
BOOT_OUT=$(realpath -m "${BOOT_OUT:-build/out/boot}")
KERNEL_CACHE=$(realpath -m "${KERNEL_CACHE:-build/out/kernels}")
APT_PRIVATE=$(realpath -m "${APT_PRIVATE:-build/out/apt}")

log() { printf 'boot-tests: %s\n' "$*" >&2; }

# Debian architecture name of a Rust/uname architecture.
deb_arch() {
  case "$1" in
    x86_64 | amd64) echo amd64 ;;
    aarch64 | arm64) echo arm64 ;;
    *) return 1 ;;
  esac
}

# The Debian suite this machine runs (bookworm here), from /etc/os-release.
host_suite() {
  . /etc/os-release
  echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
}

# Host packages the boot tests need. qemu comes from <suite>-backports: the machine already
# carries qemu-utils 10 from there, and the suite's qemu 7.2 would remove it (issue 6).
# Returns non-zero (with a reason on stderr) when they cannot be installed.
ensure_host_packages() {
  local suite need=() bp=()
  suite=$(host_suite)
  command -v qemu-system-x86_64 >/dev/null || bp+=(qemu-system-x86)
  command -v qemu-system-aarch64 >/dev/null || bp+=(qemu-system-arm)
  command -v qemu-aarch64-static >/dev/null || bp+=(qemu-user-static)
  command -v cpio >/dev/null || need+=(cpio)
  command -v dpkg-deb >/dev/null || need+=(dpkg)
  [ ${#bp[@]} -eq 0 ] && [ ${#need[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || { log "need root to install ${bp[*]} ${need[*]}"; return 1; }
  export DEBIAN_FRONTEND=noninteractive
  if [ ${#bp[@]} -gt 0 ] && ! grep -rqs "^[^#]*${suite}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding ${suite}-backports to apt sources (for ${bp[*]})"
    cat >/etc/apt/sources.list.d/gpa-${suite}-backports.sources <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: ${suite}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  apt-get update -qq || { log "apt-get update failed"; return 1; }
  if [ ${#bp[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends -t "${suite}-backports" "${bp[@]}" >/dev/null ||
      { log "cannot install ${bp[*]} from ${suite}-backports"; return 1; }
  fi
  if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
      { log "cannot install ${need[*]}"; return 1; }
  fi
}

# apt-get/apt-cache with a private state for one Debian architecture.
apt_private() {
  local arch=$1 tool=$2
  shift 2
  local root="$APT_PRIVATE/$arch"
  "$tool" -q \
    -o APT::Architecture="$arch" -o APT::Architectures::="$arch" \
    -o Dir::State="$root/state" -o Dir::State::Lists="$root/state/lists" \
    -o Dir::State::status=/dev/null -o Dir::Cache="$root/cache" \
    -o Dir::Etc::SourceList="$root/sources.list" -o Dir::Etc::SourceParts="$root/sources.list.d" \
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

# Refreshes the private package lists of one architecture (once per run).
apt_private_update() {
  local arch=$1 suite root
  suite=$(host_suite)
  root="$APT_PRIVATE/$arch"
  [ -f "$root/.updated-$$" ] && return 0
  mkdir -p "$root/state/lists/partial" "$root/cache/archives/partial" "$root/sources.list.d"
  cat >"$root/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian ${suite} main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security ${suite}-security main
EOF
  rm -f "$root"/.updated-*
  apt_private "$arch" apt-get update >/dev/null && touch "$root/.updated-$$"
}

# Downloads package $2 (resolving a metapackage's first Depends) for architecture $1 into
# directory $3; prints the .deb path.
apt_private_download() {
  local arch=$1 pkg=$2 dir=$3 real
  apt_private_update "$arch" || return 1
  real=$(apt_private "$arch" apt-cache depends "$pkg" | awk '/^  Depends:/ { print $2; exit }')
  case "$pkg" in linux-image-cloud-*) pkg=${real:?no kernel behind $pkg} ;; esac
  mkdir -p "$dir"
  (cd "$dir" && apt_private "$arch" apt-get download "$pkg" >/dev/null) || return 1
  ls -t "$dir/${pkg}"_*_"$arch".deb | head -n1
}

# Prints the path of a Debian cloud kernel image for architecture $1, fetching it on first use:
# only ./boot/vmlinuz-* is taken from the package; nothing is installed on the host.
fetch_kernel() {
  local arch=$1 cached deb tmp
  cached=$(ls "$KERNEL_CACHE"/vmlinuz-*-cloud-"$arch" 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$cached" ]; then echo "$cached"; return 0; fi
  tmp=$(mktemp -d)
  deb=$(apt_private_download "$arch" "linux-image-cloud-$arch" "$tmp") || { rm -rf "$tmp"; return 1; }
  mkdir -p "$KERNEL_CACHE"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
  mv "$tmp"/boot/vmlinuz-* "$KERNEL_CACHE/"
  rm -rf "$tmp"
  ls "$KERNEL_CACHE"/vmlinuz-*-cloud-"$arch" | sort -V | tail -n1
}

# Prints the path of Debian's static busybox for architecture $1, fetching it on first use.
fetch_busybox() {
  local arch=$1 out="$KERNEL_CACHE/busybox-$1" deb tmp
  if [ -x "$out" ]; then echo "$out"; return 0; fi
  tmp=$(mktemp -d)
  deb=$(apt_private_download "$arch" busybox-static "$tmp") || { rm -rf "$tmp"; return 1; }
  mkdir -p "$KERNEL_CACHE"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./bin/busybox
  mv "$tmp/bin/busybox" "$out"
  rm -rf "$tmp"
  echo "$out"
}

# The cargo target directory (honours CARGO_TARGET_DIR).
cargo_target_dir() {
  echo "${CARGO_TARGET_DIR:-$PWD/target}"
}

# Builds the static musl fake host for Rust target architecture $1; prints its path.
build_fake_host() {
  local arch=$1 target="$1-unknown-linux-musl"
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld \
    cargo build --release --locked --quiet --target "$target" -p gpa-system-tests --bin fake-host >&2 || return 1
  echo "$(cargo_target_dir)/$target/release/fake-host"
}
