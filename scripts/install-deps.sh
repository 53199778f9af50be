#!/usr/bin/env bash
# Installs what the build and the tests need on a Debian bookworm machine, running as root:
# etcd + etcdctl (tests start their own throwaway members), protoc (etcd-client's build.rs),
# the reference CNI plugins, iproute2 and ping (kernel tests), promtool (Debian's prometheus: the
# metrics test lints a scrape with it), rustfmt and clippy (lint steps).
# Idempotent: installs nothing when everything is already there.
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*"; }

# `ip` lives in /usr/sbin, which a non-login shell may not have on PATH.
export PATH="$PATH:/usr/sbin:/sbin"

PACKAGES=(etcd-server etcd-client protobuf-compiler containernetworking-plugins iproute2 iputils-ping openssl podman runc busybox-static prometheus libc6-dev)

missing_tools() {
  local cmd
  for cmd in etcd etcdctl protoc ip ping openssl podman runc promtool; do
    command -v "$cmd" >/dev/null 2>&1 || printf '%s ' "$cmd"
  done
  [ -x /usr/lib/cni/macvlan ] || printf '%s ' /usr/lib/cni/macvlan
  [ -x /bin/busybox ] || printf '%s ' /bin/busybox
  # glibc's static archive, for the statically linked plugins (scripts/build-release.sh).
  [ -f "/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)/libc.a" ] || printf '%s ' libc.a
}

missing=$(missing_tools)
missing=${missing% }
if [ -z "$missing" ]; then
  log "system packages: all present (etcd, etcdctl, protoc, /usr/lib/cni/macvlan, ip, ping, openssl, podman, runc, busybox, promtool, libc.a)"
else
  log "missing: $missing"
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      as_root=(sudo)
    else
      log "not root and no sudo: install ${PACKAGES[*]} as root, then run this again"
      exit 1
    fi
  fi
  log "apt-get update"
  "${as_root[@]}" apt-get update -o DPkg::Lock::Timeout=300
  # Debian's etcd-server may try to start a system etcd on the default ports; the tests never
  # use it (every member they start has its own free ports), so it is left as the package sets it.
  log "apt-get install -y ${PACKAGES[*]}"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -o DPkg::Lock::Timeout=300 "${PACKAGES[@]}"
  missing=$(missing_tools)
  missing=${missing% }
  if [ -n "$missing" ]; then
    log "still missing after apt-get install: $missing"
    exit 1
  fi
  log "system packages: installed"
fi

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: install Rust (https://rustup.rs), then run this again"
  exit 1
fi
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
  log "rust components: rustfmt and clippy present"
else
  if ! command -v rustup >/dev/null 2>&1; then
    log "cargo fmt or cargo clippy missing and no rustup to add them"
    exit 1
  fi
  log "rustup component add rustfmt clippy"
  rustup component add rustfmt clippy
fi
