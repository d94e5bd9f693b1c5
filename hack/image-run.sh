#!/usr/bin/env bash
# Imports the image archive of `cargo xtask image` into a private containerd and runs it with runc, as
# a node would: proves the archive imports and the image starts as its config says.
#
#   image-run.sh [ARCHIVE]     default: target/image/scim-token-operator.tar
#
# Checks: `--version` and `crd` run; the default command (ENTRYPOINT + CMD = `run`) starts as uid and
# gid 65532 in /home/nonroot with no capabilities, on a read-only root filesystem (it is pointed at a
# TCP listener that never answers, so it stays up long enough to be inspected, then is killed).
#
# Needs root, Debian's containerd and runc (`apt-get install containerd runc`; 1.6.20 and 1.1.5 on
# Debian 12) and python3. Starts its own containerd (socket, root and state in a temporary
# directory, CRI plugin off) and stops it on exit: nothing stays running, the system's containerd (if
# any) is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'image-run.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'image-run.sh: %s\n' "$*" >&2; }

archive="${1:-${CARGO_TARGET_DIR:-target}/image/scim-token-operator.tar}"
[[ -f "$archive" ]] || die "$archive does not exist: run cargo xtask image first"
[[ $EUID -eq 0 ]] || die "containerd needs root"
for tool in containerd ctr runc python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (apt-get install containerd runc)"
done

work="$(mktemp -d /tmp/scim-image-run.XXXXXX)"
containerd_pid=""
listener_pid=""
cleanup() {
  [[ -z "$listener_pid" ]] || kill "$listener_pid" 2>/dev/null || true
  if [[ -n "$containerd_pid" ]]; then
    ctr_ task kill -s SIGKILL scim-run >/dev/null 2>&1 || true
    ctr_ task delete scim-run >/dev/null 2>&1 || true
    ctr_ container delete scim-run >/dev/null 2>&1 || true
    kill "$containerd_pid" 2>/dev/null || true
    wait "$containerd_pid" 2>/dev/null || true
  fi
  # Snapshots may still be mounted if containerd died first.
  grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ctr_() { ctr --address "$work/containerd.sock" -n k8s.io "$@"; }

cat >"$work/config.toml" <<EOF
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
EOF
containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 50); do
  ctr_ version >/dev/null 2>&1 && break
  sleep 0.1
done
ctr_ version >/dev/null 2>&1 || { cat "$work/containerd.log" >&2; die "containerd did not start"; }
log "containerd $(containerd --version | awk '{print $3}') started (pid $containerd_pid)"

started=$SECONDS
import="$(ctr_ images import "$archive")"
image="$(sed -n 's/^unpacking \([^ ]*\) (.*)\.\.\.done$/\1/p' <<<"$import")"
[[ -n "$image" ]] || die "no image imported: $import"
log "imported $image in $((SECONDS - started))s"
ctr_ images ls | sed -n '1p;/scim-token-operator/p' >&2

binary=/usr/local/bin/scim-token-operator
version="$(ctr_ run --rm --read-only "$image" scim-version "$binary" --version)"
[[ "$version" == scim-token-operator\ * ]] || die "--version printed $version"
log "ctr run … --version: $version"
ctr_ run --rm --read-only "$image" scim-crd "$binary" crd >"$work/crd.yaml"
grep -q '^kind: CustomResourceDefinition$' "$work/crd.yaml" || die "crd printed no CustomResourceDefinition"
log "ctr run … crd: $(grep -c '' "$work/crd.yaml") lines of CustomResourceDefinition"

# The default command against an API server that accepts connections and never answers.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python3 - "$port" <<'EOF' &
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
held = []
s.settimeout(1)
end = time.time() + 60
while time.time() < end:
    try:
        held.append(s.accept()[0])
    except OSError:
        pass
EOF
listener_pid=$!
cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:$port"}}]
users: [{name: u, user: {token: not-a-token}}]
contexts: [{name: c, context: {cluster: c, user: u, namespace: default}}]
current-context: c
EOF
ctr_ run -d --read-only --net-host \
  --mount "type=bind,src=$work/kubeconfig,dst=/kubeconfig,options=rbind:ro" --env KUBECONFIG=/kubeconfig \
  "$image" scim-run >/dev/null
pid=""
for _ in $(seq 50); do
  pid="$(ctr_ task ls | awk '$1 == "scim-run" && $3 == "RUNNING" {print $2}')"
  [[ -n "$pid" ]] && break
  sleep 0.1
done
[[ -n "$pid" ]] || die "the default command did not stay up: $(ctr_ task ls)"
sleep 1
args="$(tr '\0' ' ' </proc/"$pid"/cmdline)"
uid="$(awk '/^Uid:/ {print $2 ":" $3}' /proc/"$pid"/status)"
gid="$(awk '/^Gid:/ {print $2 ":" $3}' /proc/"$pid"/status)"
caps="$(awk '/^CapEff:/ {print $2}' /proc/"$pid"/status)"
cwd="$(readlink /proc/"$pid"/cwd)"
log "ctr run (default command): $args; uid $uid, gid $gid, CapEff $caps, cwd $cwd"
[[ "$args" == "$binary run " ]] || die "the default command is $args, not $binary run"
[[ "$uid" == 65532:65532 && "$gid" == 65532:65532 ]] || die "running as uid $uid gid $gid, not 65532"
[[ "$caps" == 0000000000000000 ]] || die "effective capabilities $caps"
[[ "$cwd" == /home/nonroot ]] || die "working directory $cwd"
log "ok: the image imports and runs as its config says ($((SECONDS - started))s)"
