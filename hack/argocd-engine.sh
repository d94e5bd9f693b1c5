#!/usr/bin/env bash
# Build (once, into the cache) and locate argocd-engine: the driver in argocd/engine/ that runs
# the ScimDirectory health check and actions on Argo CD's own Lua engine
# (github.com/argoproj/argo-cd/v2/util/lua). Prints the path of the binary. tests/argocd.rs calls it.
#
#   argocd-engine.sh          builds if needed, prints the binary's path
#
# Environment:
#   ARGOCD_ENGINE_VERSION=2.14.21   the Argo CD release whose engine is built (default 2.14.21, with or
#                                   without the leading v). v2.x and v3.0-v3.2 build from the Go module
#                                   proxy; from v3.3 on, Argo CD's go.mod replaces gitops-engine with a
#                                   local directory, which a module from the proxy cannot have, and the
#                                   build stops with that message.
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/argocd-engine/v<version>-<digest>/
#   argocd-engine    the binary; <digest> covers argocd/engine/*.go, this script and the Go version,
#                    so a change to any of them builds anew. A complete build is marked by a stamp
#                    file; later runs check the stamp only (milliseconds). The last three builds of a
#                    release are kept.
#   build/           the generated wrapper module: go.mod requiring argo-cd at that version and
#                    repeating the replace directives of Argo CD's own go.mod (`go install pkg@version`
#                    refuses a module with replaces); argocd/engine/*.go with the import path of that
#                    major version (built with -tags argocd_v3 for v3, see compat_v3.go); and Argo CD's
#                    stock manifests/base/config/argocd-cm.yaml (embedded in the binary).
#
# Why from Go modules: as for hack/envtest-assets.sh, the Go module proxy is reachable here while
# release downloads and container images are not. A cold build takes a few minutes (most of it
# compiling Kubernetes' client libraries that Argo CD's packages import).
set -euo pipefail

log() { printf 'argocd-engine: %s\n' "$*" >&2; }
die() { printf 'argocd-engine: error: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  "") ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) die "unknown argument ${1}; usage: $0" ;;
esac

version="${ARGOCD_ENGINE_VERSION:-2.14.21}"
version="v${version#v}"
case "$version" in
  v2.*) module=github.com/argoproj/argo-cd/v2 tags= ;;
  v3.*) module=github.com/argoproj/argo-cd/v3 tags=argocd_v3 ;;
  *) die "ARGOCD_ENGINE_VERSION=$version: only Argo CD v2.x and v3.x are supported" ;;
esac

here="$(cd "$(dirname "$0")/.." && pwd)"
src="$here/argocd/engine"
[[ -f "$src/main.go" ]] || die "$src/main.go is missing"

command -v go >/dev/null 2>&1 || die "Go is not installed. Install Go >= 1.24 (https://go.dev/doc/install): the
  Argo CD engine is built from the Go module proxy (see this script's header)."
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
go_version="$(go env GOVERSION)"

digest="$( { cat "$src"/*.go "$0"; echo "$go_version"; } | sha256sum | cut -c1-12)"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/argocd-engine"
dest="$cache_root/$version-$digest"
bin="$dest/argocd-engine"
stamp="$dest/.complete"
want_stamp="argo-cd=$version go=$go_version"
complete() { [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; }

if complete; then
  printf '%s\n' "$bin"
  exit 0
fi

# Serialize builds: several test binaries and checkouts may ask at once. Re-check after the lock.
mkdir -p "$cache_root"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache_root/.lock"
  if ! flock -n 9; then
    log "waiting for another argocd-engine.sh to finish building"
    flock 9
  fi
fi
if complete; then
  printf '%s\n' "$bin"
  exit 0
fi

started=$SECONDS
work="$dest/build"
rm -rf "$work"
mkdir -p "$work"
cd "$work"

log "resolving $module@$version"
info="$(go mod download -json "$module@$version")" \
  || die "could not download $module@$version from the Go module proxy"
gomod="$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' <<<"$info")"
moddir="$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' <<<"$info")"
[[ -f "$gomod" && -d "$moddir" ]] || die "go mod download did not give the go.mod and sources of $module@$version"

# Argo CD's replace directives, verbatim: the block form `replace ( ... )` and single `replace x => y`
# lines. A local path (`=> ./dir`) only works inside Argo CD's own repository.
replaces="$(sed -n '/^replace[[:space:]]*($/,/^)/{/^replace/d;/^)/d;p}; s/^replace[[:space:]]\{1,\}\([^(].*=>.*\)$/\t\1/p' "$gomod")"
if grep -Eq '=>[[:space:]]*\.{1,2}/' <<<"$replaces"; then
  die "Argo CD $version replaces a module with a local directory in its go.mod:
$(grep -E '=>[[:space:]]*\.{1,2}/' <<<"$replaces")
  It cannot be built from the Go module proxy; choose a release without such a replace (v2.x, v3.0-v3.2)."
fi

{
  echo "module scim-token-operator/argocd-engine"
  echo
  echo "go $(sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/' <<<"$go_version")"
  echo
  echo "require $module $version"
  echo
  echo "replace ("
  printf '%s\n' "$replaces"
  echo ")"
} >go.mod
# The driver is written against the v2 import path; a v3 release only differs in the major version.
for file in "$src"/*.go; do
  sed "s#github.com/argoproj/argo-cd/v2/#$module/#g" "$file" >"$(basename "$file")"
done
cp "$moddir/manifests/base/config/argocd-cm.yaml" argocd-cm.yaml \
  || die "$module@$version has no manifests/base/config/argocd-cm.yaml"
chmod u+w argocd-cm.yaml

log "resolving the dependencies of $module/util/lua ($(grep -c '=>' go.mod) replace directives from Argo CD's go.mod)"
go mod tidy >&2 || die "go mod tidy failed (see above)"
log "building argocd-engine on Argo CD $version (a few minutes on a cold cache)"
go build -trimpath -tags "$tags" -ldflags "-s -w" -o "$bin.tmp" . >&2 || die "building argocd-engine failed (see above)"
mv "$bin.tmp" "$bin"
"$bin" version >&2 || die "$bin does not run"
printf '%s\n' "$want_stamp" >"$stamp"
log "built in $((SECONDS - started))s: $bin"
# Builds for earlier versions of the driver (other digests) of this release: keep the last three.
ls -dt "$cache_root/$version"-*/ 2>/dev/null | tail -n +4 | while read -r old; do rm -rf "$old"; done
printf '%s\n' "$bin"
