#!/usr/bin/env bash
# Builds a CPU image (TARGET: serve-cpu, the default, or serve-edge) with podman on a machine that
# cannot pull base images:
#   1. a local base image (Debian bookworm + python3 via debootstrap), made once and cached;
#   2. `podman build --pull=never --target $TARGET` on top of it, torch's CPU wheel taken from
#      a local wheel directory when there is one (WHEELS, default /opt/wheels).
# ARCH=arm64 builds for linux/arm64 on an x86-64 machine through qemu's user emulation (apt-get
# install qemu-user-static; binfmt_misc mounted), e.g. `ARCH=arm64 TARGET=serve-edge`.
# Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${TARGET:-serve-cpu}
ARCH=${ARCH:-$(dpkg --print-architecture)}
native=$(dpkg --print-architecture)
suffix=$([ "$ARCH" = "$native" ] && echo "" || echo "-$ARCH")
IMAGE=${IMAGE:-localhost/lorafleet-$TARGET:0.1.0$suffix}
BASE=${BASE:-localhost/lorafleet-base:bookworm-py311$suffix}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
WHEELS=${WHEELS:-/opt/wheels}
CACHE=.cache/image
mkdir -p "$CACHE"

# podman settings (CONTAINERS_CONF) for building and running: runc, and nofile/nproc limits
# within what this process may grant (podman's defaults ask for more than a sandbox allows).
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
nproc=$(ulimit -Hu)
# runc may only lower it; 16384 threads are plenty for Ray + vLLM
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 16384 ]; } && nproc=16384
cat > "$CACHE/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$PWD/$CACHE/containers.conf"

if ! podman image exists "$BASE"; then
  if [ ! -f "$CACHE/rootfs$suffix.tar" ]; then
    echo "building the base rootfs (debootstrap bookworm + python3, $ARCH), once"
    rm -rf "$CACHE/rootfs$suffix"
    debootstrap --arch="$ARCH" --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
      "$CACHE/rootfs$suffix" "$MIRROR"
    rm -rf "$CACHE/rootfs$suffix/var/cache/apt/archives"/*.deb "$CACHE/rootfs$suffix/var/lib/apt/lists"/*
    tar -C "$CACHE/rootfs$suffix" -cf "$CACHE/rootfs$suffix.tar" .
    rm -rf "$CACHE/rootfs$suffix"
  fi
  podman import --arch "$ARCH" --change 'CMD ["/bin/bash"]' "$CACHE/rootfs$suffix.tar" "$BASE"
fi

mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
args=()
if [ -d "$WHEELS" ]; then
  # torch's CPU wheel from the local directory; PyTorch's own index is then not needed
  # (and may be unreachable): PyPI stands in as the extra index.
  mounts+=(-v "$WHEELS:/wheels:ro")
  args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
time podman build --format docker --pull=never --platform "linux/$ARCH" --target "$TARGET" \
  --build-arg CPU_BASE_IMAGE="$BASE" "${args[@]}" "${mounts[@]}" -t "$IMAGE" .
podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "image %s: %.2f GB\n", "'"$IMAGE"'", $1/1e9}'
