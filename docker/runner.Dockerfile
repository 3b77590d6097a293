# syntax=docker/dockerfile:1
#
# The Outpost runner, with the tools deployment steps run: kubectl, helm, git and bash.
#
#   docker build -f docker/runner.Dockerfile -t outpost-runner .
#   docker run -v outpost-runner:/var/lib/outpost-runner \
#     -e OUTPOST_SERVER=https://outpost.example.com -e OUTPOST_REGISTRATION_TOKEN=opr_... \
#     -e OUTPOST_RUNNER_LABELS=aks-prod outpost-runner
#
# On first start the entrypoint (docker/runner-entrypoint.sh) registers the runner and keeps its
# credentials in the volume; later starts reuse them. See docs/deploy.md for every variable.
# kubectl and helm are downloaded at build time, at pinned versions, and verified against
# pinned SHA-256 sums: a changed or truncated download fails the build.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p outpost-runner --bin outpost-runner \
 && install -D -m 0755 target/release/outpost-runner /out/outpost-runner

FROM debian:${DEBIAN_RELEASE}-slim AS tools
# Keep kubectl within one minor version of the clusters it deploys to.
ARG KUBECTL_VERSION=v1.36.4
ARG KUBECTL_SHA256_amd64=8b8f088da2dab964f853b38464033b1be15ede2839eca751482357c45abdd05a
ARG KUBECTL_SHA256_arm64=0ecf44450ee6063bf19dd166a103ee6df4a9034455c2abce626e6eea657d73fb
ARG HELM_VERSION=v3.19.0
ARG HELM_SHA256_amd64=a7f81ce08007091b86d8bd696eb4d86b8d0f2e1b9f6c714be62f82f96a594496
ARG HELM_SHA256_arm64=440cf7add0aee27ebc93fada965523c1dc2e0ab340d4348da2215737fc0d76ad
ARG CA_CERTIFICATES_VERSION=20250419~deb12u2
ARG CURL_VERSION=7.88.1-10+deb12u15
# Set by BuildKit from --platform; amd64 when building without BuildKit.
ARG TARGETARCH=amd64
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      "ca-certificates=${CA_CERTIFICATES_VERSION}" \
      "curl=${CURL_VERSION}" \
 && rm -rf /var/lib/apt/lists/*
RUN case "${TARGETARCH}" in \
      amd64) kubectl_sha256="${KUBECTL_SHA256_amd64}"; helm_sha256="${HELM_SHA256_amd64}" ;; \
      arm64) kubectl_sha256="${KUBECTL_SHA256_arm64}"; helm_sha256="${HELM_SHA256_arm64}" ;; \
      *) echo "no pinned kubectl/helm checksums for ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && curl -fsSL --retry 3 -o /tmp/kubectl "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl" \
 && echo "${kubectl_sha256}  /tmp/kubectl" | sha256sum -c - \
 && install -D -m 0755 /tmp/kubectl /out/kubectl \
 && curl -fsSL --retry 3 -o /tmp/helm.tar.gz "https://get.helm.sh/helm-${HELM_VERSION}-linux-${TARGETARCH}.tar.gz" \
 && echo "${helm_sha256}  /tmp/helm.tar.gz" | sha256sum -c - \
 && tar -xzf /tmp/helm.tar.gz -C /tmp --no-same-owner "linux-${TARGETARCH}/helm" \
 && install -D -m 0755 "/tmp/linux-${TARGETARCH}/helm" /out/helm \
 && rm -rf /tmp/kubectl /tmp/helm.tar.gz "/tmp/linux-${TARGETARCH}" \
 && /out/kubectl version --client \
 && /out/helm version --short

FROM debian:${DEBIAN_RELEASE}-slim
# bash runs `run:` steps, git does `checkout`, openssh-client lets git fetch over SSH, tini reaps
# the orphans steps leave behind and passes SIGTERM on, so `docker stop` drains the runner.
# Pinned to Debian 12 (bookworm); when an update replaces one, bump the pin.
ARG BASH_VERSION=5.2.15-2+b13
ARG GIT_VERSION=1:2.39.5-0+deb12u3
ARG OPENSSH_CLIENT_VERSION=1:9.2p1-2+deb12u10
ARG TINI_VERSION=0.19.0-1+b3
ARG CA_CERTIFICATES_VERSION=20250419~deb12u2
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      "bash=${BASH_VERSION}" \
      "ca-certificates=${CA_CERTIFICATES_VERSION}" \
      "git=${GIT_VERSION}" \
      "openssh-client=${OPENSSH_CLIENT_VERSION}" \
      "tini=${TINI_VERSION}" \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 outpost \
 && useradd --system --uid 10001 --gid outpost --home-dir /var/lib/outpost-runner --shell /bin/bash outpost \
 && install -d -o outpost -g outpost -m 0700 /var/lib/outpost-runner
COPY --from=tools /out/kubectl /out/helm /usr/local/bin/
COPY --from=build /out/outpost-runner /usr/local/bin/outpost-runner
COPY --chmod=0755 docker/runner-entrypoint.sh /usr/local/bin/outpost-runner-entrypoint

USER 10001:10001
WORKDIR /var/lib/outpost-runner
# HOME is the volume too, so kubectl's and helm's caches and configs persist and stay writable.
ENV HOME=/var/lib/outpost-runner \
    OUTPOST_RUNNER_CONFIG_DIR=/var/lib/outpost-runner \
    RUST_LOG=info
VOLUME ["/var/lib/outpost-runner"]
# The runner listens on nothing; healthy means "registered, and the server answers and accepts
# this runner's credentials" (`doctor --server-only`: claims no job, asks no cluster and no
# identity endpoint, done in seconds). Run the full `outpost-runner doctor` by hand to check the
# clusters too: a cluster that is down should not mark the runner itself unhealthy.
HEALTHCHECK --interval=1m --timeout=45s --start-period=2m --retries=3 \
  CMD ["outpost-runner", "doctor", "--server-only"]
# The first SIGTERM drains (running jobs may finish, up to drain_grace_secs); give `docker stop`
# a timeout at least that long (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/outpost-runner-entrypoint"]
CMD ["run"]
