#!/bin/sh
# Entrypoint of every pod of a LeaderWorkerSet group (overlays/gpu-multinode).
# One pod = one launcher = one contiguous slice of the group's ranks:
#
#   group size   = LWS_GROUP_SIZE x DN_RANKS       (--group-size)
#   first rank   = LWS_WORKER_INDEX x DN_RANKS     (--first-rank)
#   local ranks  = DN_RANKS; local GPU i runs global rank first+i (--local-ranks)
#   group name   = the leader pod's name, the first label of LWS_LEADER_ADDRESS
#                  (<lws>-<group index>): the same on every pod of a group,
#                  different between groups, unchanged when LWS recreates the
#                  group (--name)
#   host         = this pod's IP, from the downward API (--host)
#
# LWS injects LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX into
# every container (leader: index 0, workers 1..size-1). The rest comes from
# the denoised-worker-config ConfigMap and the pod spec. Any missing or
# malformed value stops the pod with a message naming it, before anything
# starts. deploy/validate.sh runs this script with a stand-in `denoised` that
# prints its arguments, and checks the flags.
set -eu

die() {
  echo "launch-worker: $*" >&2
  exit 2
}
# need NAME WHAT: NAME must be set and non-empty.
need() {
  eval "val=\${$1:-}"
  [ -n "$val" ] || die "$1 is not set ($2)"
}
# uint NAME: NAME must be a decimal integer >= 0 without a sign.
uint() {
  eval "val=\${$1}"
  case $val in
    '' | *[!0-9]*) die "$1='$val' is not a non-negative integer" ;;
  esac
}

need LWS_LEADER_ADDRESS "set by the LeaderWorkerSet controller; is this pod part of a LeaderWorkerSet?"
need LWS_GROUP_SIZE "set by the LeaderWorkerSet controller"
need LWS_WORKER_INDEX "set by the LeaderWorkerSet controller"
need DN_RANKS "ConfigMap denoised-worker-config: ranks (GPUs) per pod"
need DN_COORDINATOR "ConfigMap denoised-worker-config: the coordinator's worker address"
need DN_MODEL_ARG "ConfigMap denoised-worker-config: --model=DIR or --preset=NAME"
need DN_BACKEND "ConfigMap denoised-worker-config: cuda or cpu"
need DN_SLICE_TIMEOUT "ConfigMap denoised-worker-config: seconds to wait for the other pods' slices"
need DN_THREADS "ConfigMap denoised-worker-config: CPU threads per rank (0: cores / ranks)"
need POD_IP "downward API status.podIP"
uint LWS_GROUP_SIZE
uint LWS_WORKER_INDEX
uint DN_RANKS
uint DN_SLICE_TIMEOUT
uint DN_THREADS
[ "$LWS_GROUP_SIZE" -ge 1 ] || die "LWS_GROUP_SIZE=$LWS_GROUP_SIZE: want at least 1 pod"
[ "$DN_RANKS" -ge 1 ] || die "DN_RANKS=$DN_RANKS: want at least 1 rank per pod"
[ "$LWS_WORKER_INDEX" -lt "$LWS_GROUP_SIZE" ] \
  || die "LWS_WORKER_INDEX=$LWS_WORKER_INDEX is not below LWS_GROUP_SIZE=$LWS_GROUP_SIZE"
case $POD_IP in
  127.* | ::1 | localhost) die "POD_IP=$POD_IP is a loopback address; other pods cannot reach it" ;;
esac

name=${LWS_LEADER_ADDRESS%%.*}
[ -n "$name" ] || die "LWS_LEADER_ADDRESS='$LWS_LEADER_ADDRESS' has no leader pod name"

exec denoised worker \
  --coordinator="$DN_COORDINATOR" \
  "$DN_MODEL_ARG" \
  --backend="$DN_BACKEND" \
  --group-size="$((LWS_GROUP_SIZE * DN_RANKS))" \
  --first-rank="$((LWS_WORKER_INDEX * DN_RANKS))" \
  --local-ranks="$DN_RANKS" \
  --name="$name" \
  --host="$POD_IP" \
  --slice-timeout="$DN_SLICE_TIMEOUT" \
  --metrics-listen=0.0.0.0:9400 \
  --threads="$DN_THREADS"
