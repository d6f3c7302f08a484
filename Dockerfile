# One image with all three binaries; docker-compose.yml picks one per service.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/gateway /src/target/release/router /src/target/release/mock-destinations /usr/local/bin/
COPY config/router.demo.toml /etc/event-delivery/router.toml
COPY config/gateway.demo.toml /etc/event-delivery/gateway.toml
USER nobody
