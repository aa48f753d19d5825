# syntax=docker/dockerfile:1
#
# txn-sidecar container image.
#
#   docker build -t txn-sidecar:local .
#   docker run --rm txn-sidecar:local --help
#
# The image sets no TXN_SIDECAR_* variables on purpose: environment variables
# override the config file, so a baked-in value would silently win over the
# user's txn-sidecar.toml. docker-compose.yml, deploy/kubernetes and the Helm
# chart set what they need (notably TXN_SIDECAR_ADMIN_ADDR=0.0.0.0:9464, since
# the default 127.0.0.1 is unreachable from outside the container).

############################ builder ############################
FROM rust:1-bookworm AS builder

# cmake/pkg-config/libssl-dev/libsasl2-dev/zlib1g-dev: the build inputs of
# rdkafka-sys (bundled librdkafka, built with ssl + zstd + libz).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      cmake libssl-dev pkg-config libsasl2-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

# distroless/cc-debian12 ships glibc, libgcc, libstdc++ and libssl3 but not
# zlib1g, so link zlib statically (libz-sys builds its bundled copy when this
# is 1). OpenSSL stays dynamic and comes from the runtime image, which keeps
# it on Debian's security updates.
ENV LIBZ_SYS_STATIC=1

WORKDIR /build

# Dependency layer: build every dependency (librdkafka is the slow one)
# against stub sources, so that editing src/ reuses this layer. It is rebuilt
# only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
# The workspace's small unsafe shim over librdkafka's C API: changes rarely, so it
# belongs to this cached layer.
COPY crates ./crates
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin txn-sidecar \
 && rm -rf src

COPY src ./src
# COPY keeps the files' original mtimes, which can be older than the stub
# build above; touch them so cargo rebuilds the crate itself.
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --bin txn-sidecar \
 && install -m 0755 target/release/txn-sidecar /usr/local/bin/txn-sidecar

# Fail the build here, not at container start, if the binary needs a shared
# library that the distroless runtime does not have.
RUN set -eu; \
    ldd /usr/local/bin/txn-sidecar; \
    extra="$(ldd /usr/local/bin/txn-sidecar | awk '{print $1}' \
      | grep -v -E '^(linux-vdso\.so\.1|/lib64/ld-linux-x86-64\.so\.2|/lib/ld-linux-aarch64\.so\.1|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libssl\.so\.3|libcrypto\.so\.3|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1)$' || true)"; \
    if [ -n "$extra" ]; then echo "not in distroless/cc-debian12: $extra" >&2; exit 1; fi; \
    /usr/local/bin/txn-sidecar --help > /dev/null

############################ runtime ############################
# cc-debian12 = glibc + libgcc/libstdc++ + libssl3 + ca-certificates + tzdata,
# no shell. The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /usr/local/bin/txn-sidecar /usr/local/bin/txn-sidecar

# Numeric, so Kubernetes' runAsNonRoot check can verify it without /etc/passwd.
USER 65532:65532

# Admin HTTP: /metrics, /healthz, /readyz, /v1/partitions, /v1/transactions.
EXPOSE 9464

ENTRYPOINT ["/usr/local/bin/txn-sidecar"]
CMD ["run"]
