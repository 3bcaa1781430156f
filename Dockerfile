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
# The release profile keeps debug info (`debug = 1`: about 100 MB). The image ships the
# binary without it: objcopy --only-keep-debug saves the DWARF to switchyard.debug, then
# strip --strip-debug drops it from the binary (the symbol table stays, so backtraces keep
# their function names), and --add-gnu-debuglink records the debug file's name and CRC so gdb
# finds it when it sits next to the binary or under /usr/lib/debug. switchyard.debug is left
# in the build stage: `docker build --target debug-info --output type=local,dest=. .` copies it
# out; keep it with the image tag to read core dumps and perf profiles later.
RUN cargo xtask build \
 && cp target/release/switchyard /switchyard \
 && objcopy --only-keep-debug /switchyard /switchyard.debug \
 && strip --strip-debug /switchyard \
 && objcopy --add-gnu-debuglink=/switchyard.debug /switchyard

# Only the debug info, for `--target debug-info --output type=local,dest=DIR`.
FROM scratch AS debug-info
COPY --from=build /switchyard.debug /switchyard.debug

FROM docker.io/library/debian:bookworm-slim
# ca-certificates: for a --kubeconfig API server with a public certificate (in a cluster the
# service account's CA is used). sh, grep, nsenter and mount, which the init container and the
# agent's bpffs fallback run, are in the base image already.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /switchyard /usr/local/bin/switchyard
ENTRYPOINT ["/usr/local/bin/switchyard"]
