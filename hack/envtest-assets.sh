#!/usr/bin/env bash
# Locate or build the envtest control-plane binaries (kube-apiserver, etcd, kubectl) and helm,
# then print the directory that holds them.
#
#   KUBEBUILDER_ASSETS set and holding kube-apiserver, etcd and kubectl -> used as is, nothing built
#   (helm is then taken from that directory, from PATH, or built into the cache).
#   Otherwise everything is built from Go modules into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/envtest/<k8s-version>/ once; later runs only
#   check the stamp file and return in well under a second.
#
# Why from Go modules: there is no Docker engine and no release-binary download here, but the Go
# module proxy is reachable. `go install k8s.io/kubernetes/cmd/kube-apiserver@v` fails because that
# go.mod replaces its staging modules with ./staging paths, so we generate a tiny module that pins
# every staging module to its published v0.X.Y tag instead.
set -euo pipefail

K8S_VERSION="${ENVTEST_K8S_VERSION:-1.36.3}"
ETCD_VERSION="${ENVTEST_ETCD_VERSION:-3.6.16}"
HELM_VERSION="${ENVTEST_HELM_VERSION:-3.22.0}"

log() { printf 'envtest-assets: %s\n' "$*" >&2; }
die() { printf 'envtest-assets: error: %s\n' "$*" >&2; exit 1; }

has_core() { [[ -x "$1/kube-apiserver" && -x "$1/etcd" && -x "$1/kubectl" ]]; }

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/envtest"
dest="$cache_root/$K8S_VERSION"

need_go() {
  command -v go >/dev/null 2>&1 || die "Go is not installed. Install Go >= 1.26 (https://go.dev/doc/install),
  or set KUBEBUILDER_ASSETS to a directory holding kube-apiserver, etcd and kubectl
  (for example: KUBEBUILDER_ASSETS=\$(setup-envtest use -p path 1.36.x))."
}

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

build_helm() { # $1: output directory
  local out="$1"
  need_go
  log "building helm v$HELM_VERSION (go install)"
  local gobin; gobin="$(mktemp -d)"
  GOBIN="$gobin" go install \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" || die "building helm failed (see above)"
  mv "$gobin/helm" "$out/helm"; rmdir "$gobin"
}

# 1. A user-provided asset directory wins; we never build the control plane over it.
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  if has_core "$KUBEBUILDER_ASSETS"; then
    if [[ ! -x "$KUBEBUILDER_ASSETS/helm" ]] && ! command -v helm >/dev/null 2>&1 && [[ ! -x "$dest/helm" ]]; then
      mkdir -p "$dest"; build_helm "$dest"
    fi
    printf '%s\n' "$KUBEBUILDER_ASSETS"
    exit 0
  fi
  log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS does not hold kube-apiserver, etcd and kubectl; using the cache instead"
fi

stamp="$dest/.complete"
want_stamp="k8s=$K8S_VERSION etcd=$ETCD_VERSION helm=$HELM_VERSION"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] && has_core "$dest" && [[ -x "$dest/helm" ]]; then
  printf '%s\n' "$dest"
  exit 0
fi

need_go
mkdir -p "$dest"
work="$cache_root/.build-$K8S_VERSION"
mkdir -p "$work/k8s" "$work/etcd"
started=$SECONDS

# 2. kube-apiserver and kubectl from k8s.io/kubernetes with generated staging replaces.
if [[ ! -x "$dest/kube-apiserver" || ! -x "$dest/kubectl" ]]; then
  log "resolving k8s.io/kubernetes@v$K8S_VERSION"
  gomod="$(cd "$work/k8s" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@v$K8S_VERSION from the Go module proxy"
  staging_version="v0.${K8S_VERSION#1.}"
  {
    echo "module scim-token-operator/envtest-k8s"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    echo "replace ("
    # Every `k8s.io/X => ./staging/src/k8s.io/X` becomes `k8s.io/X => k8s.io/X v0.M.P`.
    sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\t\1 => \1 '"$staging_version"'#p' "$gomod"
    echo ")"
  } > "$work/k8s/go.mod"
  grep -q "=> k8s.io/api $staging_version" "$work/k8s/go.mod" || die "no staging replaces found in $gomod"
  (
    cd "$work/k8s"
    log "resolving kube-apiserver and kubectl dependencies"
    go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@v$K8S_VERSION" >&2
    minor="${K8S_VERSION#1.}"; minor="${minor%%.*}"
    ld="-s -w"
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
      ld+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    log "building kube-apiserver (several minutes on a cold cache)"
    go build -trimpath -ldflags "$ld" -o "$dest/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
    log "building kubectl"
    go build -trimpath -ldflags "$ld" -o "$dest/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl >&2
  ) || die "building kube-apiserver/kubectl failed (see above); set KUBEBUILDER_ASSETS to skip the build"
  mv "$dest/kube-apiserver.tmp" "$dest/kube-apiserver"
  mv "$dest/kubectl.tmp" "$dest/kubectl"
fi

# 3. etcd in its own module, so its version selection cannot move kube-apiserver's dependencies.
if [[ ! -x "$dest/etcd" ]]; then
  (
    cd "$work/etcd"
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
"$dest/etcd" --version | head -1 >&2
printf '%s\n' "$want_stamp" > "$stamp"
log "built in $((SECONDS - started))s into $dest"
printf '%s\n' "$dest"
