# The image with the Drover binaries: drover-operator (and drover-what-if, DRS's
# dry run), drover-agent (with its drover-monitor, which keeps each VMM company)
# and drover-vmm.
#   docker build -t drover:dev .
# (No Docker engine runs on the project's CI machines; the image is built by users
# and by e2e/kind, not by ./run-tests.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
    && mkdir /out \
    && cp target/release/drover-operator target/release/drover-what-if target/release/drover-agent target/release/drover-monitor target/release/drover-vmm /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/drover-operator"]
