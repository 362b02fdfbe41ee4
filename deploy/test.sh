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

# install_missing PACKAGE WHY: installs Debian's PACKAGE (as root, with apt-get) for the tests
# that need it, like the broker above; otherwise says how, and the suite goes on without it.
install_missing() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing $1 for $2" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null; }
    else
        echo "test.sh: $1 missing; install Debian's $1 package (as root: apt-get install -y $1)," >&2
        echo "  or $2 cannot run." >&2
    fi
}
# Browser for the gateway page test (issue 5): Debian's Chromium, driven by playwright-core
# (tests/browser); the test skips only when Chromium is absent outside CI (CI=true makes it
# mandatory).
[ -x /usr/bin/chromium ] || install_missing chromium "the gateway page test"
# PHP for the handler pool tests (issue 10): Debian's php-cli (8.2 on Debian 12). Python 3 and
# Node (below) serve the other runner tests.
command -v php >/dev/null 2>&1 || install_missing php-cli "the handler pool tests"
# pika (Debian's, for Debian's Python) and php-amqplib: docs/protocol.md's Python and PHP
# examples run verbatim as the least-privilege producer (access::the_protocol_examples_...).
/usr/bin/python3 -c 'import pika' >/dev/null 2>&1 || install_missing python3-pika "the protocol examples test"
[ -r /usr/share/php/PhpAmqpLib/autoload.php ] || install_missing php-amqplib "the protocol examples test"
# Prometheus for the metrics test (issue 11): only its binary is used (the test starts its own
# server on a free loopback port with a temporary config and data dir, and kills it).
command -v prometheus >/dev/null 2>&1 || install_missing prometheus "the metrics test"
# iproute2 for the worker-host test (issue 12.4): `ip netns` and veth pairs play other hosts
# (as root; the test skips only when it cannot make namespaces outside CI, CI=true makes it
# mandatory). The 3-node cluster test needs nothing more than the broker above.
command -v ip >/dev/null 2>&1 || install_missing iproute2 "the network namespace test"
if ! command -v node >/dev/null 2>&1; then
    echo "test.sh: node not found; the gateway page test needs Node.js 20+ (apt-get install nodejs)" >&2
elif [ ! -d tests/browser/node_modules/playwright-core ]; then
    npm ci --prefix tests/browser --no-audit --no-fund
fi

# The deployment files no test can run here (Kubernetes manifests, compose file, systemd unit):
# schema validation and rules, see deploy/check-deploy.sh. With the whole suite only.
if [ "$#" -eq 0 ]; then
    bash deploy/check-deploy.sh
fi

cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
# A build without TLS must refuse amqps:// rather than connect in plaintext (issue 8.1): the
# one test that needs warren-shared without its default `tls` feature.
if [ "$#" -eq 0 ]; then
    cargo test -p warren-shared --lib --locked --no-default-features broker::
    # An application embedding the worker runtime builds it without the built-ins, the mailer
    # and the OTLP exporter (README, Layout).
    cargo check -p warren-worker --lib --locked --no-default-features
fi
