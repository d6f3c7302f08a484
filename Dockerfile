# No `# syntax=` line: it makes BuildKit pull a frontend image, which an
# offline machine (or CI without a registry) cannot; the daemon's built-in
# frontend reads everything used here, cache mounts included.
# One build, one small image per service (distroless: glibc, CA certificates
# and a non-root user; no shell, no package manager). Build one with
# `docker build --target gateway .`; docker-compose.yml builds all three.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The crate registry and target directory persist between builds (BuildKit
# cache mounts), so a code change does not rebuild every dependency.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/gateway target/release/router target/release/mock-destinations /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
# The image's `nonroot` user, by number so the runtime need not resolve it.
USER 65532:65532

FROM runtime AS gateway
COPY --from=build /out/gateway /usr/local/bin/gateway
# The demo config (its API key is published in the README): mount your own
# over it.
COPY config/gateway.demo.toml /etc/event-delivery/gateway.toml
ENV GATEWAY_LISTEN=0.0.0.0:8080
EXPOSE 8080
# Healthy once the gateway answers /readyz, i.e. reaches Redis.
HEALTHCHECK --interval=5s --timeout=5s --start-period=20s --retries=3 \
    CMD ["gateway", "--config", "/etc/event-delivery/gateway.toml", "health"]
ENTRYPOINT ["gateway", "--config", "/etc/event-delivery/gateway.toml"]

FROM runtime AS router
COPY --from=build /out/router /usr/local/bin/router
# The demo config (its admin token is published in the README): mount your
# own over it.
COPY config/router.demo.toml /etc/event-delivery/router.toml
ENV ROUTER_ADMIN__LISTEN=0.0.0.0:9100
EXPOSE 9100
HEALTHCHECK --interval=5s --timeout=5s --start-period=20s --retries=3 \
    CMD ["router", "--config", "/etc/event-delivery/router.toml", "health"]
ENTRYPOINT ["router", "--config", "/etc/event-delivery/router.toml"]

FROM runtime AS mock-destinations
COPY --from=build /out/mock-destinations /usr/local/bin/mock-destinations
EXPOSE 9000
HEALTHCHECK --interval=5s --timeout=5s --start-period=5s --retries=3 \
    CMD ["mock-destinations", "--listen", "0.0.0.0:9000", "health"]
ENTRYPOINT ["mock-destinations", "--listen", "0.0.0.0:9000"]
