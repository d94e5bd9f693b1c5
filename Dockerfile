# syntax=docker/dockerfile:1
# The operator image: a release build of the `scim-token-operator` binary on distroless, running as
# the unprivileged user 65532. Build from the workspace root:
#   docker build -t ghcr.io/scim-token-operator/scim-token-operator:0.1.0 .
#
# glibc build + distroless "cc" (glibc, libgcc, CA certificates; no shell, no package manager). Both
# stages are Debian 12 (bookworm), so the binary never needs a newer glibc than the runtime image has.
# TLS is rustls + ring: no OpenSSL at build or run time.
#
# `cargo xtask image` builds the same image without Docker (docs/helm.md, "The image"). Its tests and
# every build compare this file's final stage (USER, ENTRYPOINT, CMD, EXPOSE, the COPY destination, the
# base's workdir and env) and the builder's cargo command with what it builds (xtask/src/image.rs):
# change both together.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# The whole workspace: cargo needs every member's manifest and sources to resolve it with --locked.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p scim-token-operator --bin scim-token-operator \
    && install -D -m 0755 target/release/scim-token-operator /out/scim-token-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/scim-token-operator /usr/local/bin/scim-token-operator
USER 65532:65532
# 8080: metrics and probes (operator and verifier); 8081: the verifier's HTTP external auth;
# 8082: its gRPC ext_authz (`scim-token-operator verify`).
EXPOSE 8080 8081 8082
ENTRYPOINT ["/usr/local/bin/scim-token-operator"]
CMD ["run"]
