#!/usr/bin/env bash
# The node test: `cargo xtask cluster up` with the image of `cargo xtask image` imported into containerd,
# the verifier from that image as a pod (imagePullPolicy Never, its own ServiceAccount and Role: it
# reaches the API server through the `kubernetes` Service), a ClusterIP Service in front of it reached
# through kube-proxy from the node, the pod's process checked from the node (uid 65532, no
# capabilities, read-only root), then `cargo xtask cluster down`, which fails on any leftover.
#
#   node-test.sh [ARCHIVE]     default: target/image-check/scim-token-operator.tar (tag scim-token-operator:test)
#
# Needs root, containerd, runc, containernetworking-plugins, iptables (cargo xtask cluster --help).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'node-test.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'node-test.sh: %s\n' "$*" >&2; }

# What the node needs from Debian, installed here when missing (the test command must set up a fresh
# machine): containerd and runc run the pods, the CNI plugins wire them, iptables/conntrack serve
# kube-proxy, gcc -static builds the pause binary.
missing=()
for pair in containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
  iptables:iptables conntrack:conntrack gcc:gcc curl:curl flock:util-linux; do
  probe="${pair%%:*}" package="${pair#*:}"
  if [[ "$probe" == /* ]]; then [[ -e "$probe" ]] && continue; else command -v "$probe" >/dev/null 2>&1 && continue; fi
  missing+=("$package")
done
if ((${#missing[@]})); then
  ((EUID == 0)) || die "missing ${missing[*]}: run as root, or apt-get install ${missing[*]}"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get (a Debian machine is expected)"
  log "installing ${missing[*]} (apt-get)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; then
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 \
      || die "apt-get install ${missing[*]} failed"
  fi
fi

archive="${1:-${CARGO_TARGET_DIR:-target}/image-check/scim-token-operator.tar}"
[[ -f "$archive" ]] || die "$archive does not exist: run cargo xtask image first"
# The image's name inside the archive (crane writes a Docker archive: manifest.json's RepoTags).
image="$(tar -xOf "$archive" manifest.json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["RepoTags"][0])')"
[[ "$image" == */* ]] || image="docker.io/library/$image"
kubectl="$(bash hack/envtest-assets.sh)/kubectl"
operator="${CARGO_TARGET_DIR:-target}/debug/scim-token-operator"
[[ -x "$operator" ]] || cargo build --quiet -p scim-token-operator --bin scim-token-operator

# One cluster per machine (the containerd socket, the bridge, the kubelet's port): test commands of
# other checkouts wait for each other here.
mkdir -p /run/scim-token-operator
exec 8>/run/scim-token-operator/node-test.lock
flock 8

started=$SECONDS
up=0
finish() {
  local rc=$?
  if ((up)); then
    if ((rc)); then
      "$kubectl" -n node-test describe pod verifier 2>/dev/null | tail -20 >&2 || true
    fi
    cargo xtask cluster down || rc=1
  fi
  exit "$rc"
}
trap finish EXIT
cargo xtask cluster up --import "$archive"
up=1
up_secs=$((SECONDS - started))
export KUBECONFIG=/run/scim-token-operator/cluster/kubeconfig

"$operator" crd | "$kubectl" apply -f - >/dev/null
sed "s|IMAGE|$image|" hack/node/verifier.yaml | "$kubectl" apply -f - >/dev/null
"$kubectl" -n node-test wait pod/verifier --for=condition=Ready --timeout=120s >/dev/null
ip="$("$kubectl" -n node-test get service verifier -o jsonpath='{.spec.clusterIP}')"
[[ "$ip" == 198.19.0.* ]] || die "ClusterIP $ip is not from 198.19.0.0/24"
pod_ip="$("$kubectl" -n node-test get pod verifier -o jsonpath='{.status.podIP}')"
[[ "$pod_ip" == 198.18.0.* ]] || die "pod IP $pod_ip is not from 198.18.0.0/24"

# kube-proxy syncs the Service's rules within a second or two of its endpoints.
code=""
for _ in $(seq 100); do
  code="$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://$ip/verify/scim/v2/Users" || true)"
  [[ "$code" == 401 ]] && break
  sleep 0.2
done
[[ "$code" == 401 ]] || die "GET http://$ip/verify/scim/v2/Users answered ${code:-nothing}, not 401"
log "the verifier pod ($image, $pod_ip) answers 401 without a token through its ClusterIP $ip (kube-proxy)"
"$kubectl" -n node-test logs verifier | grep -q "index ready" || die "the verifier's log (kubectl logs) has no 'index ready'"

pid="$(pgrep -f 'scim-token-operator verify --namespace node-test' | head -1)"
[[ -n "$pid" ]] || die "no verifier process on the node"
uid="$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")"
caps="$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")"
ro="$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | cut -d, -f1)"
log "on the node: pid $pid, uid $uid, CapEff $caps, root mounted $ro"
[[ "$uid" == 65532 && "$caps" == 0000000000000000 && "$ro" == ro ]] || die "the pod does not run as 65532 with no capabilities on a read-only root"

up=0
cargo xtask cluster down
log "ok in $((SECONDS - started))s (cluster up ${up_secs}s)"
