#!/usr/bin/env bash
# A local base image (Debian bookworm + python3 + venv + CA certificates) for
# machines that cannot pull from a registry: debootstrap, then `podman import`.
# Cached: does nothing when the image already exists.
set -euo pipefail
image="${1:-localhost/bakehouse-base:bookworm}"
if podman image exists "$image"; then
  exit 0
fi
rootfs="$(mktemp -d /var/tmp/bakehouse-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "make-base-image: debootstrap bookworm into $rootfs" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" >/dev/null
tar -C "$rootfs" -c . | podman import - "$image" >/dev/null
echo "make-base-image: $image" >&2
