# Dockerfile - the pgrunner worker image.
#
# Two stages: `build` compiles with CMake against Debian's -dev packages;
# the runtime stage holds the binary, the runtime libraries and nothing
# else, and runs as an unprivileged user.
#
#   docker build -t pgrunner .
#   docker run -e DATABASE_URL=postgres://... pgrunner            # a worker
#   docker run -e DATABASE_URL=postgres://... pgrunner migrate    # the schema
#
# BASE_IMAGE is any Debian 12 image; tests/stack/run.sh passes a locally
# built one when no image registry can be reached.
#
# dpkg's --force-unsafe-io below: a layer is committed whole, so syncing each
# unpacked file only slows the build.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      -o Dpkg::Options::=--force-unsafe-io \
      cmake make gcc libc6-dev pkgconf \
      libpq-dev libuv1-dev libesmtp-dev libmicrohttpd-dev libcurl4-openssl-dev \
      libjansson-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY cmake/ cmake/
COPY include/ include/
COPY sql/ sql/
COPY worker/ worker/
RUN cmake -S . -B /build -DPGR_TESTS=OFF -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_INSTALL_PREFIX=/usr/local \
 && cmake --build /build -j"$(nproc)" \
 && DESTDIR=/out cmake --install /build --strip

FROM ${BASE_IMAGE}
# The runtime libraries only; the health check below needs nothing but bash
# (part of every Debian image), so no curl.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      -o Dpkg::Options::=--force-unsafe-io \
      libpq5 libuv1 libesmtp6 libmicrohttpd12 libcurl4 libjansson4 libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /nonexistent \
      --no-create-home --shell /usr/sbin/nologin pgrunner \
 && printf '%s\n' \
      '#!/bin/bash' \
      '# GET /healthz from the worker of this container, with no HTTP client:' \
      '# bash opens the TCP connection itself.' \
      'listen=${PGRUNNER_METRICS_LISTEN:?PGRUNNER_METRICS_LISTEN is not set}' \
      'host=${listen%:*} port=${listen##*:}' \
      'case $host in' \
      '  "" | "*" | 0.0.0.0) host=127.0.0.1 ;;' \
      '  "[::]" | "::") host=::1 ;;' \
      '  "["*"]") host=${host:1:-1} ;;' \
      'esac' \
      'exec 3<>"/dev/tcp/$host/$port" || exit 1' \
      'printf "GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n" >&3' \
      'read -r -t 5 _ code _ <&3 && [[ $code == 200 ]]' \
    >/usr/local/bin/pgrunner-healthcheck \
 && chmod 755 /usr/local/bin/pgrunner-healthcheck
COPY --from=build /out/usr/local/ /usr/local/

# /metrics and /healthz are on by default here, so that the health check
# works out of the box; set PGRUNNER_METRICS_LISTEN to move them.
ENV PGRUNNER_METRICS_LISTEN=0.0.0.0:9187
# GnuTLS (reached through libpq -> libldap) initialises itself at load time
# unless told not to; pgrunner never uses it (~750 KiB of RSS).
ENV GNUTLS_NO_IMPLICIT_INIT=1
EXPOSE 9187
USER 10001:10001
# SIGTERM: stop claiming, let running tasks finish (--shutdown-timeout,
# 30 s by default; give `docker stop` a longer -t), exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/pgrunner-healthcheck"]
ENTRYPOINT ["pgrunner"]
CMD ["work"]
