#!/usr/bin/env bash
# Build (once, into the cache) and locate what tests/argocd_sync.rs runs of a real Argo CD: the
# `argocd` multi-call binary of Argo CD v2.14.21 (application controller, repo server, API server and
# CLI, chosen by the name it is started under), Argo CD's CRDs from the same release, and Debian's
# redis-server. Prints one KEY=VALUE line each:
#
#   ARGOCD=<cache>/argocd          the binary, version-stamped (`argocd version --client`)
#   ARGOCD_CRDS=<cache>/crds       manifests/crds/*.yaml of that release
#   ARGOCD_CONFIG=<cache>/config   manifests/base/config/ of that release: the stock argocd-cm,
#                                  argocd-rbac-cm, argocd-secret, argocd-cmd-params-cm...
#   REDIS_SERVER=<path>            redis-server to run (a wrapper that sets LD_LIBRARY_PATH when unpacked)
#
# Environment:
#   ARGOCD_VERSION=2.14.21   the release (v2.x, v3.0-v3.2: see hack/argocd-engine.sh for why not later)
#   SCIM_TEST_REDIS=PATH     use this redis-server; otherwise redis-server on PATH, otherwise Debian's
#                            redis-server and redis-tools packages with the two libraries they need that a
#                            usual Debian 12 lacks (libjemalloc2, liblzf1), fetched with `apt-get
#                            download` and unpacked into the cache (never installed system-wide; as root
#                            the script runs `apt-get update` when the package lists are missing)
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/argocd/v<version>-<digest>/ (digest: this
#   script, hack/lib/argocd-module.sh and the Go version). build/ is the generated wrapper module
#   (hack/lib/argocd-module.sh): it requires Argo CD and repeats the replace block of its go.mod, the way
#   hack/argocd-engine.sh builds the Lua engine. A complete build is marked by a stamp file; later runs
#   only check it. Redis goes to .../argocd/redis-<package version>/.
#
# Cost, measured on the 2-core machine with the Go module and build caches already warm from
# hack/argocd-engine.sh: see docs/gitops.md ("The sync test").
set -euo pipefail

log() { printf 'argocd.sh: %s\n' "$*" >&2; }
die() { printf 'argocd.sh: error: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  "") ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) die "unknown argument ${1}; usage: $0" ;;
esac

here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=hack/lib/argocd-module.sh
source "$here/hack/lib/argocd-module.sh"

argocd_module "${ARGOCD_VERSION:-2.14.21}"
argocd_go_env
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/argocd"
digest="$( { cat "$0" "$here/hack/lib/argocd-module.sh"; echo "$GO_VERSION"; } | sha256sum | cut -c1-12)"
dest="$cache_root/$ARGOCD_VERSION-$digest"
bin="$dest/argocd"
stamp="$dest/.complete"
want_stamp="argo-cd=$ARGOCD_VERSION go=$GO_VERSION"
complete() { [[ -x "$bin" && -d "$dest/crds" && -d "$dest/config" && -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; }

build_argocd() {
  complete && return 0
  argocd_lock "$cache_root"
  complete && return 0
  local started=$SECONDS work="$dest/build"
  rm -rf "$work"
  mkdir -p "$work"
  (
    cd "$work"
    argocd_wrapper_gomod scim-token-operator/argocd
    log "resolving the dependencies of $ARGOCD_MODULE/cmd"
    go get "$ARGOCD_MODULE/cmd@$ARGOCD_VERSION" >&2 || die "go get $ARGOCD_MODULE/cmd failed (see above)"
    # The stamps Argo CD's Makefile sets (common/version.go): without them the binary says v99.99.99.
    local pkg="$ARGOCD_MODULE/common" kubectl date
    kubectl="$(go list -m -f '{{.Version}}' k8s.io/kubectl 2>/dev/null || echo unknown)"
    date="$(go mod download -json "$ARGOCD_MODULE@$ARGOCD_VERSION" | sed -n 's/.*"Time": "\(.*\)".*/\1/p' | head -1)"
    log "building argocd $ARGOCD_VERSION (about 3-4 min with warm Go caches, much longer cold)"
    go build -trimpath -ldflags "-s -w -X $pkg.version=${ARGOCD_VERSION#v} -X $pkg.buildDate=${date:-1970-01-01T00:00:00Z} -X $pkg.gitTreeState=clean -X $pkg.kubectlVersion=$kubectl" \
      -o "$bin.tmp" "$ARGOCD_MODULE/cmd" >&2 || die "building argocd failed (see above)"
    rm -rf "$dest/crds" "$dest/config"
    cp -r "$ARGOCD_MODDIR/manifests/crds" "$dest/crds"
    cp -r "$ARGOCD_MODDIR/manifests/base/config" "$dest/config"
    chmod -R u+w "$dest/crds" "$dest/config"
  )
  mv "$bin.tmp" "$bin"
  "$bin" version --client --short >&2 || die "$bin does not run"
  printf '%s\n' "$want_stamp" >"$stamp"
  log "built in $((SECONDS - started))s: $bin"
  ls -dt "$cache_root/$ARGOCD_VERSION"-*/ 2>/dev/null | tail -n +3 | while read -r old; do rm -rf "$old"; done
}

# locate_redis: sets REDIS.
locate_redis() {
  if [[ -n "${SCIM_TEST_REDIS:-}" ]]; then
    [[ -x "$SCIM_TEST_REDIS" ]] || die "SCIM_TEST_REDIS=$SCIM_TEST_REDIS is not an executable"
    REDIS="$SCIM_TEST_REDIS"
    return 0
  fi
  if REDIS="$(command -v redis-server 2>/dev/null)"; then
    return 0
  fi
  local dir wrapper
  dir="$(ls -d "$cache_root"/redis-*/ 2>/dev/null | head -1 || true)"
  wrapper="${dir%/}/redis-server"
  if [[ -n "$dir" && -f "${dir%/}/.complete" && -x "$wrapper" ]]; then
    REDIS="$wrapper"
    return 0
  fi
  argocd_lock "$cache_root"
  { command -v apt-get && command -v dpkg-deb; } >/dev/null 2>&1 \
    || die "no redis-server on PATH, and apt-get/dpkg-deb are missing to fetch Debian's: install Redis >= 6
  or set SCIM_TEST_REDIS to a redis-server binary"
  local started=$SECONDS download apt_opts=(-q) packages=(redis-server redis-tools libjemalloc2 liblzf1)
  download="$(mktemp -d "$cache_root/.download.XXXXXX")"
  # As root, apt drops to the _apt user to download, which cannot enter a 0700 home.
  [[ $EUID -ne 0 ]] || apt_opts+=(-o APT::Sandbox::User=root)
  log "downloading Debian's ${packages[*]} (apt-get download)"
  if ! (cd "$download" && apt-get "${apt_opts[@]}" download "${packages[@]}" >&2); then
    [[ $EUID -eq 0 ]] || die "apt-get download failed (see above). If the package lists are missing or stale,
  run 'sudo apt-get update' once, or install redis-server, or set SCIM_TEST_REDIS"
    log "apt-get download failed; refreshing the package lists (apt-get update) and retrying"
    apt-get -q update >&2 || die "apt-get update failed (see above)"
    (cd "$download" && apt-get "${apt_opts[@]}" download "${packages[@]}" >&2) \
      || die "apt-get download ${packages[*]} failed even after apt-get update (see above)"
  fi
  local version root
  version="$(dpkg-deb -f "$(ls "$download"/redis-server_*.deb)" Version)"
  version="${version#*:}"
  dir="$cache_root/redis-$version"
  root="$dir/root"
  rm -rf "$dir"
  mkdir -p "$root"
  for deb in "$download"/*.deb; do dpkg-deb -x "$deb" "$root"; done
  rm -rf "$download"
  # Debian's /usr/bin/redis-server is a symlink to redis-check-rdb: one binary, mode chosen by argv[0].
  local libdir
  libdir="$(dirname "$(find "$root" -name 'libjemalloc.so.2' | head -1)")"
  cat >"$dir/redis-server" <<EOF
#!/usr/bin/env bash
LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec -a redis-server "$root/usr/bin/redis-check-rdb" "\$@"
EOF
  chmod +x "$dir/redis-server"
  "$dir/redis-server" --version >&2 || die "the unpacked redis-server does not run (missing libraries?)"
  touch "$dir/.complete"
  log "redis-server $version unpacked into $dir in $((SECONDS - started))s"
  REDIS="$dir/redis-server"
}

build_argocd
locate_redis
printf 'ARGOCD=%s\nARGOCD_CRDS=%s\nARGOCD_CONFIG=%s\nREDIS_SERVER=%s\n' "$bin" "$dest/crds" "$dest/config" "$REDIS"
