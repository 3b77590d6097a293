# syntax=docker/dockerfile:1
#
# The Outpost job server.
#
#   docker build -f docker/server.Dockerfile -t outpost-server .
#   docker run -p 8080:8080 -v outpost-data:/var/lib/outpost outpost-server
#
# Without OUTPOST__DATABASE__URL the server keeps SQLite under /var/lib/outpost (a volume);
# point it at PostgreSQL for production and for several replicas (docs/deploy.md).
# Every setting is an OUTPOST__SECTION__KEY environment variable (README.md lists them).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The registry and target caches make a rebuild after a code change take seconds, not minutes;
# the binary is copied out because the cache mount is gone once this step ends.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p outpost-server --bin outpost-server \
 && install -D -m 0755 target/release/outpost-server /out/outpost-server

FROM debian:${DEBIAN_RELEASE}-slim
# curl is only for the HEALTHCHECK; ca-certificates for TLS to PostgreSQL.
# Versions are pinned to Debian 12 (bookworm); when a Debian update replaces one, the build fails
# loudly at this step and the fix is to bump the pin (`apt-cache policy NAME` shows the new one).
ARG CA_CERTIFICATES_VERSION=20250419~deb12u2
ARG CURL_VERSION=7.88.1-10+deb12u15
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      "ca-certificates=${CA_CERTIFICATES_VERSION}" \
      "curl=${CURL_VERSION}" \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid/gid (also in USER, so Kubernetes runAsNonRoot can check it) keeps volumes
# working across rebuilds and matches the runner image.
RUN groupadd --system --gid 10001 outpost \
 && useradd --system --uid 10001 --gid outpost --home-dir /var/lib/outpost --shell /usr/sbin/nologin outpost \
 && install -d -o outpost -g outpost -m 0750 /var/lib/outpost /var/lib/outpost/bootstrap
COPY --from=build /out/outpost-server /usr/local/bin/outpost-server

USER 10001:10001
WORKDIR /var/lib/outpost
ENV OUTPOST__DATA_DIR=/var/lib/outpost \
    OUTPOST__SERVER__LISTEN=0.0.0.0:8080 \
    RUST_LOG=info,sqlx=warn,tower_http=warn
VOLUME ["/var/lib/outpost"]
EXPOSE 8080
# /healthz answers as long as the process serves HTTP; /readyz also checks the database, which is
# what a load balancer should use (docs/deploy.md).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
# SIGTERM makes the server stop accepting, finish open requests (server.shutdown_grace_secs) and exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/outpost-server"]
CMD ["serve"]
