#!/usr/bin/env bash
# The node test: the chart installed with Helm on `cargo xtask cluster up`, with the image of
# `cargo xtask image` imported into the node's containerd, as a user installs it (the README's release
# name and namespace, `image.pullPolicy: Never`, 2 operator replicas with leader election, the
# verifier's 2 default replicas, the PodDisruptionBudgets, the admission policy, the NetworkPolicies):
#
# - every pod becomes Ready through its own probes; each pod's process, seen from the node, runs as
#   65532 with no capabilities, no new privileges, seccomp and a read-only root;
# - the leader's Lease names a pod (the downward-API identity); a ScimDirectory applied with kubectl
#   gets a Secret whose token the verifier's ClusterIP Service (kube-proxy) answers 200 for, and 401
#   for a wrong one;
# - `helm upgrade` to a second image tag rolls every pod with no second token (status, Secret
#   resourceVersion, Events, tokens_issued metrics) and not one failed verification meanwhile;
# - deleting the leader pod (the node cordoned, so no replacement can race it) hands the Lease to the
#   standby, the PodDisruptionBudget then refuses an eviction, and a rotation after it happens
#   exactly once; the old token is refused;
# - `kubectl logs` of every pod holds no token; then `cargo xtask cluster down`, which fails on any
#   leftover. The bridge CNI enforces no NetworkPolicy: they are applied, not proven by refused traffic.
# Then the README's `cargo xtask demo --node --once` with the same image.
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
repository="${image%:*}" tag="${image##*:}"
kubectl="$(bash hack/envtest-assets.sh)/kubectl"
helm="$(bash hack/envtest-assets.sh --helm)"

# The README's install: release and namespace `scim-token-operator` (so every name is the release's).
ns=scim-token-operator release=scim-token-operator
verifier="$release-verifier"
dir_ns=team-a
# Tokens and the Authorization headers made of them: files only root reads, never arguments.
work="$(mktemp -d)"
chmod 700 "$work"

# One cluster per machine (the containerd socket, the bridge, the kubelet's port): test commands of
# other checkouts wait for each other here.
mkdir -p /run/scim-token-operator
exec 8>/run/scim-token-operator/node-test.lock
flock 8

started=$SECONDS
up=0
finish() {
  local rc=$?
  [[ -n "${loop_pid:-}" ]] && kill "$loop_pid" 2>/dev/null
  if ((up)); then
    if ((rc)); then
      "$kubectl" -n "$ns" get pods,lease,pdb -o wide >&2 || true
      "$kubectl" get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -20 >&2 || true
    fi
    cargo xtask cluster down || rc=1
  fi
  rm -rf "$work"
  exit "$rc"
}
trap finish EXIT
cargo xtask cluster up --import "$archive"
up=1
up_secs=$((SECONDS - started))
export KUBECONFIG=/run/scim-token-operator/cluster/kubeconfig
k() { "$kubectl" "$@"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
# `until_true DESCRIPTION SECONDS COMMAND...`: polls COMMAND every 0.2 s.
until_true() {
  local what="$1" deadline=$((SECONDS + $2))
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 0.2
  done
}
operator_pods() { k -n "$ns" get pods -l "app.kubernetes.io/name=$release" -o jsonpath='{.items[*].metadata.name}'; }
all_pods() { k -n "$ns" get pods -o jsonpath='{.items[*].metadata.name}'; }
holder() { k -n "$ns" get lease "$release" -o jsonpath='{.spec.holderIdentity}'; }
status_of() { k -n "$dir_ns" get scimdir acme -o jsonpath="{.status.$1}"; }
# The status, the Secret's token hash annotation and resourceVersion: what a second token would change.
record() {
  printf '%s %s %s %s\n' "$(status_of tokenHash)" "$(status_of tokenIssuedAt)" \
    "$(k -n "$dir_ns" get secret acme-scim-token -o jsonpath='{.metadata.annotations.scim\.tokenops\.dev/token-hash}')" \
    "$(k -n "$dir_ns" get secret acme-scim-token -o jsonpath='{.metadata.resourceVersion}')"
}
# The Secret's token into $work/$1 (and onto the list the logs are searched for), its header into $1.header.
take_token() {
  k -n "$dir_ns" get secret acme-scim-token -o jsonpath='{.data.token}' | base64 -d >"$work/$1"
  local hash
  hash="sha256:$(sha256sum <"$work/$1" | cut -d' ' -f1)"
  [[ "$hash" == "$(status_of tokenHash)" ]] || die "the Secret's token does not hash to status.tokenHash"
  cat "$work/$1" >>"$work/tokens" && echo >>"$work/tokens"
  printf 'Authorization: Bearer %s\n' "$(cat "$work/$1")" >"$work/$1.header"
}
# `verify HEADER_FILE`: the verifier's answer through its ClusterIP Service (kube-proxy) from the node.
verify() { curl -s -o /dev/null -w '%{http_code}' -m 2 -H @"$1" "http://$verify_ip:8081/verify/scim/v2/Users" || true; }
# Tokens issued, by reason, summed over the live operator pods' /metrics (from the node, by pod IP).
issued() {
  local ip
  for ip in $(k -n "$ns" get pods -l "app.kubernetes.io/name=$release" -o jsonpath='{.items[*].status.podIP}'); do
    curl -sf -m 2 "http://$ip:8080/metrics" || die "no /metrics from the operator pod at $ip"
  done | awk '/^scim_token_operator_tokens_issued_total/ { n += $2; r = r " " $1 } END { printf "%d%s\n", n, r }'
}
events() { k -n "$dir_ns" get events.events.k8s.io -o jsonpath='{range .items[*]}{.reason} {.series.count} {.reportingInstance}{"\n"}{end}'; }
# Every pod's log (kubectl logs) holds no token seen so far; called before any pod goes away.
check_logs() {
  local pod logs
  for pod in $(all_pods); do
    logs="$(k -n "$ns" logs "$pod")"
    [[ -n "$logs" ]] || die "kubectl logs $pod is empty"
    if grep -qF -f "$work/tokens" <<<"$logs"; then die "kubectl logs $pod holds a plaintext token"; fi
  done
}
# From the node: each pod's container process (containerd's task for the pod's containerID).
check_processes() {
  local pod id pid uid gid caps nnp seccomp root cmd mem
  for pod in $(all_pods); do
    id="$(k -n "$ns" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')"
    pid="$(node_ctr task ls | awk -v id="${id#containerd://}" '$1 == id { print $2 }')"
    [[ -n "$pid" ]] || die "no containerd task for $pod ($id)"
    uid="$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")" gid="$(awk '/^Gid:/ { print $2 }' "/proc/$pid/status")"
    caps="$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status")" nnp="$(awk '/^NoNewPrivs:/ { print $2 }' "/proc/$pid/status")"
    seccomp="$(awk '/^Seccomp:/ { print $2 }' "/proc/$pid/status")"
    root="$(awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo" | cut -d, -f1)"
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
    mem="$(working_set "$pid")"
    log "  $pod: pid $pid ($cmd), uid $uid, gid $gid, CapEff $caps, NoNewPrivs $nnp, Seccomp $seccomp, root $root, working set $mem, $(grep ^RssAnon: "/proc/$pid/status" | tr -s ' \t' ' ')"
    [[ "$uid" == 65532 && "$gid" == 65532 && "$caps" == 0000000000000000 && "$nnp" == 1 && "$seccomp" == 2 && "$root" == ro ]] ||
      die "$pod does not run as 65532:65532 with no capabilities, no new privileges, seccomp and a read-only root"
  done
}
# The container's working set as the kubelet computes it: its cgroup's usage minus inactive file pages
# (cgroup v1 here; v2 too). Reported, never asserted.
working_set() {
  local v1 v2 cg
  v1="$(awk -F: '$2 == "memory" { print $3 }' "/proc/$1/cgroup")" v2="$(awk -F: '$1 == "0" { print $3 }' "/proc/$1/cgroup")"
  if cg="/sys/fs/cgroup/memory$v1" && [[ -n "$v1" && -f "$cg/memory.usage_in_bytes" ]]; then
    awk -v u="$(cat "$cg/memory.usage_in_bytes")" '$1 == "total_inactive_file" { printf "%.1f MiB", (u - $2) / 1048576 }' "$cg/memory.stat"
  elif cg="/sys/fs/cgroup$v2" && [[ -f "$cg/memory.current" ]]; then
    awk -v u="$(cat "$cg/memory.current")" '$1 == "inactive_file" { printf "%.1f MiB", (u - $2) / 1048576 }' "$cg/memory.stat"
  else
    printf 'unknown'
  fi
}
node_ctr() { ctr --address /run/containerd/containerd.sock --namespace k8s.io "$@"; }
pods_settled() { # $1: the image every pod of the release runs; exactly 2 + 2 pods, all Ready, none terminating
  local out
  out="$(k -n "$ns" get pods -o jsonpath='{range .items[*]}{.spec.containers[0].image} {.metadata.deletionTimestamp} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')"
  [[ "$(grep -c . <<<"$out")" == 4 && "$(grep -cxF "$1  True" <<<"$out")" == 4 ]]
}

t="$(now)"
"$helm" install "$release" charts/scim-token-operator -n "$ns" --create-namespace \
  --set image.repository="$repository" --set image.tag="$tag" --set image.pullPolicy=Never --set replicas=2 \
  --wait --timeout 180s >/dev/null
install_secs="$(since "$t")"
pods_settled "$image" || die "not 2 operator + 2 verifier pods Ready after helm install --wait"
log "helm install: 2 operator and 2 verifier pods Ready (their own probes) in ${install_secs}s"
for ip in $(k -n "$ns" get pods -o jsonpath='{.items[*].status.podIP}'); do
  [[ "$ip" == 198.18.0.* ]] || die "pod IP $ip is not from 198.18.0.0/24"
done
verify_ip="$(k -n "$ns" get service "$verifier" -o jsonpath='{.spec.clusterIP}')"
[[ "$verify_ip" == 198.19.0.* ]] || die "ClusterIP $verify_ip is not from 198.19.0.0/24"
check_processes
pdbs_allow() { [[ "$(k -n "$ns" get pdb -o jsonpath='{.items[*].status.disruptionsAllowed}')" == "$1 $1" ]]; }
until_true "both PodDisruptionBudgets to allow 1 disruption" 30 pdbs_allow 1
[[ "$(k -n "$ns" get networkpolicy -o name | wc -l)" == 2 ]] || die "the chart's 2 NetworkPolicies are not there"
log "PodDisruptionBudgets allow 1 disruption each; 2 NetworkPolicies applied (the bridge CNI does not enforce them)"
leader="$(holder)"
[[ " $(operator_pods) " == *" $leader "* ]] || die "the Lease's holder '$leader' is not an operator pod (POD_NAME from the downward API)"
log "leader (Lease $ns/$release): $leader"

k create namespace "$dir_ns" >/dev/null
t="$(now)"
k -n "$dir_ns" apply -f examples/basic.yaml >/dev/null
has_token() { [[ "$(status_of observedRotationGeneration)" == 0 && -n "$(status_of tokenHash)" ]]; }
until_true "acme's first token" 60 has_token
take_token first
printf 'Authorization: Bearer scim_not-a-token\n' >"$work/wrong.header"
code=""
for _ in $(seq 100); do
  code="$(verify "$work/first.header")"
  [[ "$code" == 200 ]] && break
  sleep 0.2
done
[[ "$code" == 200 ]] || die "the verifier's ClusterIP answered ${code:-nothing} to acme's token, not 200"
log "ScimDirectory applied -> token in Secret acme-scim-token -> 200 from http://$verify_ip:8081/verify in $(since "$t")s"
[[ "$(verify "$work/wrong.header")" == 401 ]] || die "a wrong token was not answered 401"
[[ "$(issued)" == "1 scim_token_operator_tokens_issued_total{reason=\"Initial\"}" ]] || die "tokens issued: $(issued), not 1 Initial"
[[ -z "$(events)" ]] || die "Events of a first token: $(events)"
check_logs

# helm upgrade to a second tag of the same image: every pod rolls; the verifier keeps answering.
node_ctr images tag "$image" "$repository:upgrade" >/dev/null
before="$(record)"
(
  while :; do
    verify "$work/first.header"
    echo
    sleep 0.1
  done
) >"$work/codes" &
loop_pid=$!
t="$(now)"
"$helm" upgrade "$release" charts/scim-token-operator -n "$ns" --reuse-values --set image.tag=upgrade \
  --wait --timeout 180s >/dev/null
until_true "the old pods to be gone after helm upgrade" 120 pods_settled "$repository:upgrade"
upgrade_secs="$(since "$t")"
sleep 1
kill "$loop_pid"
wait "$loop_pid" 2>/dev/null || true
loop_pid=""
answers="$(grep -c . "$work/codes")"
failed="$(grep -vc '^200$' "$work/codes" || true)"
((failed == 0 && answers >= 10)) || die "during helm upgrade $failed of $answers verifications were not 200: $(sort "$work/codes" | uniq -c | tr '\n' ' ')"
[[ "$(record)" == "$before" ]] || die "helm upgrade changed the token or its Secret: $before -> $(record)"
[[ "$(issued)" == 0 ]] || die "tokens issued by the upgraded pods: $(issued)"
[[ -z "$(events)" ]] || die "Events after helm upgrade: $(events)"
leader="$(holder)"
[[ " $(operator_pods) " == *" $leader "* ]] || die "after helm upgrade the Lease's holder '$leader' is not a live operator pod"
log "helm upgrade (image tag upgrade): all 4 pods rolled in ${upgrade_secs}s, $answers verifications all 200, no second token (status, Secret resourceVersion, Events, metrics); leader $leader"
check_processes

# Failover: the node cordoned, so the Deployment's replacement stays Pending and only the standby can
# take the Lease.
check_logs
standby="$(operator_pods | tr ' ' '\n' | grep -vx "$leader")"
k cordon scim-node >/dev/null
t="$(now)"
k -n "$ns" delete pod "$leader" --wait=false >/dev/null
moved() { local h; h="$(holder)"; [[ -n "$h" && "$h" != "$leader" ]]; }
until_true "the Lease to leave $leader" 60 moved
failover_secs="$(since "$t")"
[[ "$(holder)" == "$standby" ]] || die "the Lease went to '$(holder)', not to the standby $standby"
log "deleted the leader $leader: the standby $standby holds the Lease after ${failover_secs}s"
pdb_blocks() { [[ "$(k -n "$ns" get pdb "$release" -o jsonpath='{.status.disruptionsAllowed}')" == 0 ]]; }
until_true "the operator's PodDisruptionBudget to allow no disruption" 30 pdb_blocks
printf '{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"%s","namespace":"%s"}}' "$standby" "$ns" >"$work/eviction.json"
if out="$(k create --raw "/api/v1/namespaces/$ns/pods/$standby/eviction" -f "$work/eviction.json" 2>&1)"; then
  die "the eviction of the last operator pod $standby was allowed"
fi
grep -q 'disruption budget' <<<"$out" || die "the eviction of $standby failed otherwise: $out"
log "the PodDisruptionBudget refuses evicting the last ready operator pod: ${out#Error from server }"
k uncordon scim-node >/dev/null
k -n "$ns" wait --for=delete "pod/$leader" --timeout=60s >/dev/null
k -n "$ns" rollout status "deployment/$release" --timeout=120s >/dev/null
[[ "$(record)" == "$before" && "$(issued)" == 0 && -z "$(events)" ]] ||
  die "the failover issued a token: $before -> $(record), tokens issued $(issued), Events $(events)"

# A rotation after the failover: exactly one new token.
t="$(now)"
k -n "$dir_ns" patch scimdir acme --type merge -p '{"spec":{"rotationGeneration":1}}' >/dev/null
rotated() { [[ "$(status_of observedRotationGeneration)" == 1 ]]; }
until_true "the rotation" 60 rotated
rotation_secs="$(since "$t")"
take_token second
[[ "$(verify "$work/second.header")" == 200 ]] || die "the rotated token was not answered 200"
refused() { [[ "$(verify "$work/first.header")" == 401 ]]; }
until_true "the replaced token to be refused (401)" 10 refused
sleep 2
[[ "$(issued)" == "1 scim_token_operator_tokens_issued_total{reason=\"RotationGenerationChanged\"}" ]] ||
  die "tokens issued after the failover: $(issued), not 1 RotationGenerationChanged"
[[ "$(events)" == "RotationGenerationChanged  $standby" ]] || die "Events of the rotation: $(events)"
[[ "$(record | cut -d' ' -f1)" == "$(record | cut -d' ' -f3)" ]] || die "the Secret's token-hash is not the status's"
log "rotationGeneration 1: one new token in ${rotation_secs}s (one Event from $standby, tokens_issued 1), 200 for it, 401 for the old one"
check_logs
restarts="$(k -n "$ns" get pods -o jsonpath='{.items[*].status.containerStatuses[0].restartCount}')"
[[ "$restarts" =~ ^(0\ )*0$ ]] || die "container restarts: $restarts"
log "kubectl logs of every pod: no token; no container restarted"

# For BENCHMARKS.md (not in the test command): NODE_TEST_DIRECTORIES=1000 adds that many directories
# and reports the pods' memory again once every one is Ready.
if ((${NODE_TEST_DIRECTORIES:-0} > 0)); then
  n=$NODE_TEST_DIRECTORIES
  k create namespace bench >/dev/null
  for i in $(seq "$n"); do
    printf 'apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata: {name: d%d, namespace: bench}\nspec: {}\n---\n' "$i"
  done >"$work/directories.yaml"
  t="$(now)"
  k apply --server-side -f "$work/directories.yaml" >/dev/null
  all_ready() { [[ "$(k -n bench get scimdir -o jsonpath='{range .items[*]}{.status.conditions[0].status}{"\n"}{end}' | grep -c '^True$')" == "$n" ]]; }
  until_true "$n directories to be Ready" 600 all_ready
  log "$n directories Ready $(since "$t")s after kubectl apply; the pods' memory 10 s later:"
  sleep 10
  check_processes
fi

up=0
cargo xtask cluster down
test_secs=$((SECONDS - started))

# The README's demo on the node (its own cluster up and down), still under the lock.
t=$SECONDS
cargo xtask demo --node --once --image "$archive"
log "ok in $((SECONDS - started))s: the chart test ${test_secs}s (cluster up ${up_secs}s, helm install to Ready ${install_secs}s, upgrade ${upgrade_secs}s, failover ${failover_secs}s), demo --node --once $((SECONDS - t))s"
