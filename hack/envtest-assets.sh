#!/usr/bin/env bash
# Locate or build the envtest control-plane binaries (kube-apiserver, etcd, kubectl,
# kube-controller-manager) and helm, then print the directory that holds them.
#
#   envtest-assets.sh                          prints the assets directory
#   envtest-assets.sh --controller-manager     prints the path of the kube-controller-manager to run
#                                              with those assets (only differs from <dir>/... when
#                                              KUBEBUILDER_ASSETS lacks it, see below)
#   envtest-assets.sh --helm                   prints the path of the helm to use (<dir>/helm, else
#                                              helm on PATH, else one built into the cache)
#   envtest-assets.sh --node                   prints the directory holding kube-scheduler, kubelet and
#                                              kube-proxy (`cargo xtask cluster`), building the missing
#                                              ones: <dir> itself when it is the cache or holds all
#                                              three, else ${cache}/<version of its kube-apiserver>/
#
#   KUBEBUILDER_ASSETS set and holding kube-apiserver, etcd and kubectl -> used as is, the control plane
#   is never built over it. helm is then taken from that directory, from PATH, or built into the cache;
#   kube-controller-manager (the test harness runs its garbage collector) is taken from that directory
#   or built into ${cache}/<version of that kube-apiserver>/, so its version matches the API server's.
#   Otherwise everything is built from Go modules into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/envtest/<k8s-version>/ once; later runs only
#   check the stamp file and return in well under a second. A cache that lacks only some binaries (for
#   example one made before kube-controller-manager was added) builds just those.
#
# Why from Go modules: there is no Docker engine and no release-binary download here, but the Go
# module proxy is reachable. `go install k8s.io/kubernetes/cmd/kube-apiserver@v` fails because that
# go.mod replaces its staging modules with ./staging paths, so we generate a tiny module that pins
# every staging module to its published v0.X.Y tag instead.
set -euo pipefail

K8S_VERSION="${ENVTEST_K8S_VERSION:-1.36.3}"
ETCD_VERSION="${ENVTEST_ETCD_VERSION:-3.6.16}"
HELM_VERSION="${ENVTEST_HELM_VERSION:-3.22.0}"
# The commands built from k8s.io/kubernetes for the test control plane, and those a node adds
# (`--node`, on demand only: the test control plane never needs them). All of them are resolved
# together in one generated module, whichever are built, so they share one dependency graph.
K8S_BINARIES=(kube-apiserver kubectl kube-controller-manager)
NODE_BINARIES=(kube-scheduler kubelet kube-proxy)

log() { printf 'envtest-assets: %s\n' "$*" >&2; }
die() { printf 'envtest-assets: error: %s\n' "$*" >&2; exit 1; }

mode=dir
case "${1:-}" in
  "") ;;
  --controller-manager) mode=controller-manager ;;
  --helm) mode=helm ;;
  --node) mode=node ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) die "unknown argument ${1}; usage: $0 [--controller-manager | --helm | --node]" ;;
esac

# emit ASSETS_DIR CONTROLLER_MANAGER_DIR: the one line of output.
emit() {
  case "$mode" in
    controller-manager) printf '%s\n' "$2/kube-controller-manager" ;;
    helm)
      if [[ -x "$1/helm" ]]; then
        printf '%s\n' "$1/helm"
      elif command -v helm >/dev/null 2>&1; then
        command -v helm
      else
        printf '%s\n' "$dest/helm"
      fi
      ;;
    *) printf '%s\n' "$1" ;;
  esac
}

has_core() { [[ -x "$1/kube-apiserver" && -x "$1/etcd" && -x "$1/kubectl" ]]; }

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/envtest"
dest="$cache_root/$K8S_VERSION"

need_go() {
  command -v go >/dev/null 2>&1 || die "Go is not installed. Install Go >= 1.26 (https://go.dev/doc/install),
  or set KUBEBUILDER_ASSETS to a directory holding kube-apiserver, etcd, kubectl and kube-controller-manager
  (for example: KUBEBUILDER_ASSETS=\$(setup-envtest use -p path 1.36.x), plus a kube-controller-manager
  of the same version copied into it)."
}

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

# Serialize builds: test binaries, hack/test.sh and other checkouts may all run this at once.
# Callers re-check what is missing after taking the lock.
locked=
lock() {
  [[ -z "$locked" ]] || return 0
  mkdir -p "$cache_root"
  command -v flock >/dev/null 2>&1 || { locked=1; return 0; }
  exec 9>"$cache_root/.lock"
  if ! flock -n 9; then
    log "waiting for another envtest-assets.sh to finish building"
    flock 9
  fi
  locked=1
}

build_helm() { # $1: output directory
  local out="$1"
  need_go
  mkdir -p "$out"
  log "building helm v$HELM_VERSION (go install)"
  local gobin; gobin="$(mktemp -d)"
  GOBIN="$gobin" go install \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" || die "building helm failed (see above)"
  mv "$gobin/helm" "$out/helm"; rmdir "$gobin"
}

# build_k8s VERSION OUTDIR BINARY...: build the given k8s.io/kubernetes commands at VERSION.
build_k8s() {
  local version="$1" out="$2"; shift 2
  need_go
  local work="$cache_root/.build-$version/k8s" gomod staging_version bin
  mkdir -p "$work" "$out"
  log "resolving k8s.io/kubernetes@v$version"
  gomod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@v$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@v$version from the Go module proxy"
  staging_version="v0.${version#1.}"
  {
    echo "module scim-token-operator/envtest-k8s"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
    echo
    echo "require k8s.io/kubernetes v$version"
    echo
    echo "replace ("
    # Every `k8s.io/X => ./staging/src/k8s.io/X` becomes `k8s.io/X => k8s.io/X v0.M.P`.
    sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\t\1 => \1 '"$staging_version"'#p' "$gomod"
    echo ")"
  } > "$work/go.mod"
  grep -q "=> k8s.io/api $staging_version" "$work/go.mod" || die "no staging replaces found in $gomod"
  (
    cd "$work"
    log "resolving ${K8S_BINARIES[*]} ${NODE_BINARIES[*]} dependencies"
    local tools=()
    for bin in "${K8S_BINARIES[@]}" "${NODE_BINARIES[@]}"; do tools+=("k8s.io/kubernetes/cmd/$bin@v$version"); done
    go get -tool "${tools[@]}" >&2
    local minor="${version#1.}"; minor="${minor%%.*}"
    local ld="-s -w" pkg
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
      ld+=" -X $pkg.gitVersion=v$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    for bin in "$@"; do
      log "building $bin v$version (minutes on a cold cache)"
      go build -trimpath -ldflags "$ld" -o "$out/$bin.tmp" "k8s.io/kubernetes/cmd/$bin" >&2
    done
  ) || die "building $* failed (see above); set KUBEBUILDER_ASSETS to skip the build"
  for bin in "$@"; do mv "$out/$bin.tmp" "$out/$bin"; done
}

has_node() { local bin; for bin in "${NODE_BINARIES[@]}"; do [[ -x "$1/$bin" ]] || return 1; done; }

# --node: the control plane first (this script without arguments), then the node's binaries beside it
# or in the cache for that control plane's version.
if [[ "$mode" == node ]]; then
  dir="$(bash "$0")"
  if has_node "$dir"; then
    printf '%s\n' "$dir"
    exit 0
  fi
  version="$K8S_VERSION"
  if [[ "$dir" != "$dest" ]]; then
    version="$("$dir/kube-apiserver" --version 2>/dev/null | sed -n 's/^Kubernetes v\([0-9]*\.[0-9]*\.[0-9]*\)$/\1/p')"
    [[ -n "$version" ]] || die "cannot tell the version of $dir/kube-apiserver; put ${NODE_BINARIES[*]} of its version beside it"
    dir="$cache_root/$version"
  fi
  if ! has_node "$dir"; then
    lock
    missing=()
    for bin in "${NODE_BINARIES[@]}"; do [[ -x "$dir/$bin" ]] || missing+=("$bin"); done
    if ((${#missing[@]})); then
      started=$SECONDS
      build_k8s "$version" "$dir" "${missing[@]}"
      log "built ${missing[*]} in $((SECONDS - started))s into $dir"
    fi
  fi
  printf '%s\n' "$dir"
  exit 0
fi

# 1. A user-provided asset directory wins; we never build the control plane over it.
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  if has_core "$KUBEBUILDER_ASSETS"; then
    if [[ ! -x "$KUBEBUILDER_ASSETS/helm" ]] && ! command -v helm >/dev/null 2>&1 && [[ ! -x "$dest/helm" ]]; then
      lock
      [[ -x "$dest/helm" ]] || build_helm "$dest"
    fi
    kcm_dir="$KUBEBUILDER_ASSETS"
    if [[ ! -x "$kcm_dir/kube-controller-manager" ]]; then
      # kube-controller-manager must not be newer than kube-apiserver: build the same version.
      version="$("$KUBEBUILDER_ASSETS/kube-apiserver" --version 2>/dev/null | sed -n 's/^Kubernetes v\([0-9]*\.[0-9]*\.[0-9]*\)$/\1/p')"
      if [[ -z "$version" ]]; then
        version="$K8S_VERSION"
        log "cannot tell the version of $KUBEBUILDER_ASSETS/kube-apiserver; using kube-controller-manager v$version"
      fi
      kcm_dir="$cache_root/$version"
      if [[ ! -x "$kcm_dir/kube-controller-manager" ]]; then
        lock
        [[ -x "$kcm_dir/kube-controller-manager" ]] || build_k8s "$version" "$kcm_dir" kube-controller-manager
      fi
    fi
    emit "$KUBEBUILDER_ASSETS" "$kcm_dir"
    exit 0
  fi
  log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS does not hold kube-apiserver, etcd and kubectl; using the cache instead"
fi

stamp="$dest/.complete"
want_stamp="k8s=$K8S_VERSION (${K8S_BINARIES[*]}) etcd=$ETCD_VERSION helm=$HELM_VERSION"
complete() {
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] && has_core "$dest" \
    && [[ -x "$dest/kube-controller-manager" && -x "$dest/helm" ]]
}
if complete; then
  emit "$dest" "$dest"
  exit 0
fi

need_go
lock
if complete; then # another process finished the build while we waited
  emit "$dest" "$dest"
  exit 0
fi
mkdir -p "$dest"
started=$SECONDS

# 2. kube-apiserver, kubectl and kube-controller-manager from k8s.io/kubernetes with generated
#    staging replaces; only the missing ones are built.
missing=()
for bin in "${K8S_BINARIES[@]}"; do
  [[ -x "$dest/$bin" ]] || missing+=("$bin")
done
if ((${#missing[@]})); then
  build_k8s "$K8S_VERSION" "$dest" "${missing[@]}"
fi

# 3. etcd in its own module, so its version selection cannot move kube-apiserver's dependencies.
if [[ ! -x "$dest/etcd" ]]; then
  work="$cache_root/.build-$K8S_VERSION/etcd"
  mkdir -p "$work"
  (
    cd "$work"
    cat > go.mod <<GOMOD
module scim-token-operator/envtest-etcd

go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')
GOMOD
    cat > main.go <<'GOMAIN'
// Command etcd is the upstream etcd server entry point, built as a module dependency.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GOMAIN
    log "resolving go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
    go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
    go mod tidy >&2
    log "building etcd"
    go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=v$ETCD_VERSION" -o "$dest/etcd.tmp" . >&2
  ) || die "building etcd failed (see above); set KUBEBUILDER_ASSETS to skip the build"
  mv "$dest/etcd.tmp" "$dest/etcd"
fi

# 4. helm has no replaces: plain go install works.
[[ -x "$dest/helm" ]] || build_helm "$dest"

"$dest/kube-apiserver" --version >&2
"$dest/kube-controller-manager" --version >&2
# sed, not head: head exits after one line, and etcd's SIGPIPE would then fail the pipeline (pipefail).
"$dest/etcd" --version | sed -n 1p >&2
printf '%s\n' "$want_stamp" > "$stamp"
log "built in $((SECONDS - started))s into $dest"
emit "$dest" "$dest"
