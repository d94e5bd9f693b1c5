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
# `failpoints` compiles in the crash points the end-to-end suite uses; release builds leave them out.
cargo clippy --workspace --all-targets --locked --features scim-token-operator/failpoints -- -D warnings
cargo clippy --workspace --all-targets --locked -- -D warnings
# Licences, bans and sources of every dependency (deny.toml); see deny.toml for advisories.
"$(bash hack/cargo-deny.sh)" check --hide-inclusion-graph licenses bans sources
# The release workflow (actionlint + shellcheck; actionlint is built once into the cache).
bash hack/lint-workflows.sh
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
cargo test --workspace --locked --features scim-token-operator/failpoints "$@" 2>&1 | tee "$results"

# The container image, assembled as `cargo xtask image` does (Debian packages, crane, the checks
# against the Dockerfile, the binary run on the image's own libraries), from the binary the tests just
# built: it links the same libraries as the release build, which would cost minutes more (BENCHMARKS.md).
cargo xtask image --binary "${CARGO_TARGET_DIR:-target}/debug/scim-token-operator" \
  --out "${CARGO_TARGET_DIR:-target}/image-check" --tag scim-token-operator:test

# That image on a real single-node cluster (cargo xtask cluster up|down): the chart installed with Helm
# (2 operator and 2 verifier pods Ready through their probes, run as 65532 on a read-only root), a token
# issued and verified through the verifier's ClusterIP Service, helm upgrade with no second token and no
# failed verification, leader failover and a rotation exactly once after it, no token in any pod's log,
# nothing left on the machine after `down`, then `cargo xtask demo --node --once` (≈ 65 s warm).
bash hack/node-test.sh "${CARGO_TARGET_DIR:-target}/image-check/scim-token-operator.tar"

# The README's main-job command must keep working: run it once, non-interactively.
cargo xtask demo --once

# A small benchmark run keeps `cargo xtask bench` from rotting; it asserts correctness (all Ready, one
# status write per directory, zero writes while idle and across a restart), never time.
cargo xtask bench --n 50 --runs 1 --idle-secs 10 --rotations 10 --check
# The same for `cargo xtask bench-verify`: every token over HTTP and gRPC, every load run's answers, gRPC
# health, rotations seen over both protocols; its own load generator (no oha to build).
cargo xtask bench-verify --n 50 --load-secs 2 --rounds 1 --rotations 5 --check

# One closing line for the whole suite (cargo's last "test result" is an empty doc-test target).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$results"
