# Tally: one image with the one `tally` binary; compose.yaml runs it as ingest, aggregator,
# api and the one-shot setup.

# ---- build ----------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build

# rdkafka-sys builds librdkafka from its bundled sources with librdkafka's own ./configure and
# make (no cmake): it needs a C and C++ toolchain, make, pkg-config, and zlib headers for the
# default `libz` feature. The rust image already has most of this; listing it keeps the
# requirement visible and the build working on slimmer bases.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential pkg-config zlib1g-dev python3 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tally \
 && install -D -m 0755 target/release/tally /out/tally

# ---- runtime --------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# librdkafka is linked statically; zlib (libz.so.1) dynamically. ca-certificates for any TLS
# endpoint a user configures; curl for container health checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tally

COPY --from=build /out/tally /usr/local/bin/tally

USER tally
ENV TALLY_INGEST_LISTEN=0.0.0.0:8080 \
    TALLY_API_LISTEN=0.0.0.0:8081
EXPOSE 8080 8081
ENTRYPOINT ["tally"]
CMD ["--help"]
