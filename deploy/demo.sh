#!/usr/bin/env bash
# demo.sh: Warren's demo command (see README.md). Makes sure a RabbitMQ broker is up
# (deploy/ensure-broker.sh), builds release binaries and runs `warren demo`, passing
# any arguments through. AMQP_URL selects the broker
# (default amqp://guest:guest@127.0.0.1:5672/%2f).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

bash deploy/ensure-broker.sh

if ! command -v cargo >/dev/null 2>&1; then
    echo "demo.sh: cargo not found. Install Rust with rustup (https://rustup.rs) and run this again." >&2
    exit 1
fi

cargo build --release --workspace --bins --locked
exec target/release/warren demo "$@"
