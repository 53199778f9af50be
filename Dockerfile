# The hostnic-ipam image: hostnic-ipamd and the CNI plugins its init container installs on every
# node (etc/kubernetes/hostnic-ipam.yaml); iproute2 for the daemon's NIC links in QingCloud mode.
# Build from the repository root:
#
#   docker build -t hostnic-ipam:0.1.0 .
#
# The binaries sit together in /opt/hostnic/bin, where `hostnic-ipamd install-cni` looks for the
# plugins by default (its own directory).

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The daemon as cargo builds it; the plugins statically linked (see the script).
RUN scripts/build-release.sh --locked

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/dist/hostnic-ipamd /src/target/dist/hostnic-ipam /src/target/dist/hostnic /opt/hostnic/bin/
ENTRYPOINT ["/opt/hostnic/bin/hostnic-ipamd"]
