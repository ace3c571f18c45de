#!/usr/bin/env bash
# Builds the CPU-only variant of the Dockerfile with podman and runs it:
# `denoised demo` inside the image, then the default command (the coordinator)
# with its grpc.health.v1 HEALTHCHECK. No registry pulls: the debian:12 base
# is made locally with debootstrap and tagged as the FROM image; packages come
# from Debian's archive (apt-get inside the build stage).
#
#   sudo deploy/container-test.sh            # about 1 min + the compile
#
# Needs root (rootful podman), podman + runc + debootstrap (installed here with
# apt-get when missing) and Debian's archive. Uses deploy/podman/containers.conf
# through CONTAINERS_CONF (runc, and ulimits a sandbox without
# CAP_SYS_RESOURCE accepts). Env: DN_CONTAINER_CACHE (default build/container-test),
# DN_IMAGE (default localhost/denoised:cpu-test), DN_KEEP_IMAGE=1 to keep it,
# BUILD_JOBS (default: all cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${DN_CONTAINER_CACHE:-$root/build/container-test}
image=${DN_IMAGE:-localhost/denoised:cpu-test}
base=docker.io/library/debian:12
export CONTAINERS_CONF=$root/deploy/podman/containers.conf
name=denoised-ct-$$

log() { echo "container-test: $*"; }
die() { echo "container-test: FAIL: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (rootful podman, debootstrap)"
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q --no-install-recommends "${missing[@]}"; }
fi

cleanup() {
  podman rm -f -t 2 "$name" >/dev/null 2>&1 || true
  rm -rf "$cache/rootfs"
  if [[ ${DN_KEEP_IMAGE:-0} != 1 ]]; then podman rmi -f "$image" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# 1. The base image, made here (no pull).
if ! podman image exists "$base"; then
  log "debootstrap bookworm (minbase) -> $base"
  mkdir -p "$cache"
  rm -rf "$cache/rootfs"
  debootstrap --variant=minbase bookworm "$cache/rootfs" \
    > "$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log"; die "debootstrap"; }
  tar -C "$cache/rootfs" -c . | podman import - "$base" >/dev/null
  rm -rf "$cache/rootfs"
fi

# 2. The CPU-only image, from the real Dockerfile.
log "podman build (CPU variant) -> $image"
podman build --pull=never --format docker -f "$root/Dockerfile" -t "$image" \
  --build-arg BUILD_IMAGE="$base" --build-arg RUNTIME_IMAGE="$base" \
  --build-arg DENOISED_CUDA=OFF --build-arg BUILD_JOBS="${BUILD_JOBS:-}" \
  "$root"

# 3. What the image is: non-root, only the runtime libraries, no compiler.
user=$(podman image inspect --format '{{.Config.User}}' "$image")
[[ $user == 10001:10001 ]] || die "image user is '$user', want 10001:10001"
podman run --rm --network=none --no-healthcheck --entrypoint sh "$image" -c \
  '! command -v c++ && ! command -v cmake && ! ls /usr/include/grpcpp >/dev/null 2>&1' \
  >/dev/null || die "the runtime image carries build tools or headers"
log "image $(podman image inspect --format '{{.Size}}' "$image") bytes, user $user"

# 4. The demo inside the image (coordinator + 2-rank CPU group + one request).
# (--no-healthcheck: podman schedules HEALTHCHECKs through systemd timers,
# which a build sandbox lacks; step 5 runs the declared check itself.)
log "podman run $image demo"
demo_out=$(timeout 300 podman run --rm --network=none --no-healthcheck "$image" demo) \
  || die "denoised demo in the container"
# It must have found the trained model the image carries, and drawn the clip.
grep -q "random-weight stand-in" <<<"$demo_out" \
  && die "the demo in the image found no model at /opt/denoised/share/denoised/demo_model"
grep -q "clip.gif" <<<"$demo_out" || die "the demo in the image wrote no GIF"

# 5. The default command (the coordinator), probed with the image's own
# HEALTHCHECK command: NOT_SERVING while no worker group is attached, SERVING
# once a 2-rank CPU group (started inside the same container) is READY.
mapfile -t check < <(podman image inspect --format '{{range .Config.Healthcheck.Test}}{{println .}}{{end}}' "$image" | sed '/^$/d')
[[ ${check[0]:-} == CMD ]] || die "image HEALTHCHECK is '${check[*]:-}', want CMD ..."
check=("${check[@]:1}")
log "HEALTHCHECK: ${check[*]}"
podman run -d --name "$name" --network=none --no-healthcheck "$image" >/dev/null
up=0
for _ in $(seq 1 30); do  # wait until the coordinator answers at all
  out=$(podman exec "$name" "${check[@]}" 2>&1) && break
  if [[ $out == NOT_SERVING* ]]; then up=1; break; fi
  sleep 1
done
[[ $up == 1 ]] || { podman logs "$name" 2>&1 | tail -20; die "coordinator without workers: HEALTHCHECK said '$out', want NOT_SERVING"; }
log "HEALTHCHECK without a worker group: NOT_SERVING (unhealthy), as it should be"
podman exec -d "$name" denoised worker --coordinator 127.0.0.1:50052 --preset tiny \
  --ranks 2 --backend cpu --name container-test >/dev/null
ok=0
for _ in $(seq 1 120); do
  if podman exec "$name" "${check[@]}" >/dev/null 2>&1; then ok=1; break; fi
  sleep 1
done
[[ $ok == 1 ]] || { podman logs "$name" 2>&1 | tail -20; die "HEALTHCHECK never passed with a worker group attached"; }
log "HEALTHCHECK with a READY worker group: SERVING (healthy)"
log "PASS"
