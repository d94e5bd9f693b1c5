#!/usr/bin/env bash
# The one test command: builds (or locates) the control-plane binaries, then runs every test,
# end-to-end tests on a real kube-apiserver + etcd included. Nothing is skipped: if the assets cannot
# be had, this fails and says what to install or set.
set -euo pipefail
cd "$(dirname "$0")/.."

assets="$(bash hack/envtest-assets.sh)" || {
  echo "test.sh: the envtest control plane is unavailable (see the message above)." >&2
  exit 1
}
export KUBEBUILDER_ASSETS="$assets"
echo "test.sh: control plane binaries in $KUBEBUILDER_ASSETS" >&2

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"

# The README's main-job command must keep working: run it once, non-interactively.
cargo xtask demo --once
