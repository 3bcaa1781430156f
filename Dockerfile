# syntax=docker/dockerfile:1
# The switchyard image that deploy/30-daemonset.yaml runs. Untested: there is no container
# engine on the development machines. Build from the workspace root: `docker build -t IMAGE .`

# The same steps as on a workstation: `cargo xtask build` uses stable Rust (>= 1.95) for the
# agent and nightly (>= 1.97, LLVM 22) for the eBPF programs, and installs rust-src and
# bpf-linker (built against nightly's own LLVM) itself.
FROM docker.io/library/rust:1.95-bookworm AS build
# Plainly "nightly": the channel proxy-ebpf/rust-toolchain.toml names.
RUN rustup toolchain install nightly --profile minimal
WORKDIR /src
COPY . .
# strip --strip-debug keeps the symbols (readable backtraces), drops the DWARF of `debug = 1`.
RUN cargo xtask build \
 && cp target/release/switchyard /switchyard \
 && strip --strip-debug /switchyard

FROM docker.io/library/debian:bookworm-slim
# ca-certificates: for a --kubeconfig API server with a public certificate (in a cluster the
# service account's CA is used). sh, grep, nsenter and mount, which the init container and the
# agent's bpffs fallback run, are in the base image already.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /switchyard /usr/local/bin/switchyard
ENTRYPOINT ["/usr/local/bin/switchyard"]
