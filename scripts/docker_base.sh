#!/usr/bin/env bash
# Make a local base image for the Docker kit on a machine that reaches no image registry: a minimal Debian
# bookworm (Python 3.11 from Debian's packages, pip usable system-wide as in python:3.11-slim) made with
# debootstrap and imported into the container engine. Needs root, debootstrap and a Debian mirror.
#   scripts/docker_base.sh [IMAGE]      (default localhost/fedtune-base:bookworm)
#   ENGINE=podman|docker  MIRROR=http://deb.debian.org/debian
# Then build with --build-arg BASE_IMAGE=IMAGE, or: python scripts/docker_smoke.py --base-image IMAGE
set -euo pipefail
IMAGE="${1:-localhost/fedtune-base:bookworm}"
ENGINE="${ENGINE:-$(command -v podman || command -v docker)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOTFS" "$MIRROR"
rm -f "$ROOTFS"/usr/lib/python3.11/EXTERNALLY-MANAGED   # as python:3.11-slim: pip installs system-wide
ln -sf python3 "$ROOTFS/usr/bin/python"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$ENGINE" import - "$IMAGE"
echo "base image $IMAGE"
