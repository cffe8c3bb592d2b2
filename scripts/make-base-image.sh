#!/usr/bin/env bash
# A local base image (Debian bookworm + python3 + venv + CA certificates, plus any
# extra Debian packages named after the image) for machines that cannot pull from
# a registry: debootstrap, then `podman import`. Cached: does nothing when the
# image already exists.
#   scripts/make-base-image.sh localhost/bakehouse-base:bookworm
#   scripts/make-base-image.sh localhost/bakehouse-sshhost:bookworm openssh-server
set -euo pipefail
image="${1:-localhost/bakehouse-base:bookworm}"
shift || true
if podman image exists "$image"; then
  exit 0
fi
# One maker at a time (parallel test workers ask for the same image): the second finds it made.
exec 9>"/var/tmp/bakehouse-make-base-image.lock"
flock 9
if podman image exists "$image"; then
  exit 0
fi
include="python3,python3-venv,ca-certificates"
for pkg in "$@"; do include="$include,$pkg"; done
rootfs="$(mktemp -d /var/tmp/bakehouse-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "make-base-image: debootstrap bookworm ($include) into $rootfs" >&2
debootstrap --variant=minbase --include="$include" bookworm "$rootfs" >/dev/null
tar -C "$rootfs" -c . | podman import - "$image" >/dev/null
echo "make-base-image: $image" >&2
