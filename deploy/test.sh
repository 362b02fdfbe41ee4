#!/usr/bin/env bash
# test.sh: Warren's test command (see README.md). Makes sure a RabbitMQ broker is up
# (deploy/ensure-broker.sh), builds the workspace binaries that the integration tests
# spawn (target/debug/warren, target/debug/warren-worker), then runs the whole test
# suite. Extra arguments go to `cargo test`, e.g.:
#   deploy/test.sh -p warren-tests -- --nocapture
# AMQP_URL selects the broker (default amqp://guest:guest@127.0.0.1:5672/%2f).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

bash deploy/ensure-broker.sh

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found. Install Rust with rustup (https://rustup.rs):" >&2
    echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
    echo "then open a new shell (or: . \"\$HOME/.cargo/env\") and run this script again." >&2
    exit 1
fi

# Browser for the gateway page test (issue 5): Debian's Chromium, driven by playwright-core
# (tests/browser). Installed when missing, like the broker above; the test itself skips only when
# Chromium is absent outside CI (CI=true makes it mandatory).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing chromium for the gateway page test" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
    else
        echo "test.sh: /usr/bin/chromium missing; install Debian's chromium package (as root:" >&2
        echo "  apt-get install -y chromium) or the gateway page test is skipped outside CI." >&2
    fi
fi
# PHP for the handler pool tests (issue 10): Debian's php-cli (8.2 on Debian 12), installed when
# missing like Chromium above. Python 3 and Node (below) serve the other runner tests.
if ! command -v php >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing php-cli for the handler pool tests" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq php-cli >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq php-cli >/dev/null; }
    else
        echo "test.sh: php missing; install Debian's php-cli package (as root:" >&2
        echo "  apt-get install -y php-cli) or the handler pool tests fail." >&2
    fi
fi
# Prometheus for the metrics test (issue 11): Debian's package, only its binary is used (the test
# starts its own server on a free loopback port with a temporary config and data dir, and kills it).
if ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing prometheus for the metrics test" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
    else
        echo "test.sh: prometheus missing; install Debian's prometheus package (as root:" >&2
        echo "  apt-get install -y prometheus); the metrics test needs it." >&2
    fi
fi
if ! command -v node >/dev/null 2>&1; then
    echo "test.sh: node not found; the gateway page test needs Node.js 20+ (apt-get install nodejs)" >&2
elif [ ! -d tests/browser/node_modules/playwright-core ]; then
    npm ci --prefix tests/browser --no-audit --no-fund
fi

cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
# A build without TLS must refuse amqps:// rather than connect in plaintext (issue 8.1): the
# one test that needs warren-shared without its default `tls` feature.
if [ "$#" -eq 0 ]; then
    cargo test -p warren-shared --lib --locked --no-default-features broker::
fi
