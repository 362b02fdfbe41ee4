#!/usr/bin/env bash
# ensure-broker.sh: make sure a RabbitMQ broker answers at $AMQP_URL, with the
# management plugin on, and wait until it is ready.
#
#   AMQP_URL   broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
#   BROKER_WAIT_SECS       how long to wait for the AMQP port (default 30)
#   RABBITMQ_MGMT_PORT     management HTTP port to wait for (default 15672)
#
# What it does:
#   - remote host in AMQP_URL: only waits (bounded) for the port; never starts anything.
#   - local host (127.0.0.1, localhost, ::1) and the port answers: makes sure the
#     rabbitmq_management plugin is enabled on the local node (best effort, warns on
#     failure) and waits for the management port.
#   - local host and nothing answers: starts the installed rabbitmq-server (installing
#     it with apt-get first when root on Debian/Ubuntu), or a Docker container
#     `warren-rabbitmq` when a Docker engine answers; otherwise says what to do and
#     exits 1.
# Idempotent: with the broker up and the plugin on it returns in well under 2 s.
# Progress goes to stderr, prefixed "ensure-broker:".
set -euo pipefail

AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
BROKER_WAIT_SECS="${BROKER_WAIT_SECS:-30}"
MGMT_PORT="${RABBITMQ_MGMT_PORT:-15672}"
DOCKER_NAME="warren-rabbitmq"
DOCKER_IMAGE="rabbitmq:3-management"

log() { echo "ensure-broker: $*" >&2; }
warn() { echo "ensure-broker: warning: $*" >&2; }
die() { echo "ensure-broker: error: $*" >&2; exit 1; }

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# port_open HOST PORT: true when a TCP connection to HOST:PORT succeeds within 1 s.
port_open() {
    # shellcheck disable=SC2016 # $1/$2 expand in the inner bash, on purpose
    timeout 1 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# wait_port HOST PORT SECONDS: poll until the port answers or SECONDS pass.
wait_port() {
    local host=$1 port=$2 secs=$3
    local deadline=$((SECONDS + secs))
    until port_open "$host" "$port"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
}

# --- parse host and port out of AMQP_URL -------------------------------------
case "$AMQP_URL" in
    amqp://*) default_port=5672 ;;
    amqps://*) default_port=5671 ;;
    *) die "AMQP_URL must start with amqp:// or amqps:// (got '${AMQP_URL%%://*}://...')" ;;
esac
authority="${AMQP_URL#*://}"
authority="${authority%%/*}"
authority="${authority%%\?*}"
hostport="${authority##*@}" # drop user:password@ (never printed)
if [[ "$hostport" == \[* ]]; then
    # [IPv6]:port
    host="${hostport#\[}"
    host="${host%%]*}"
    rest="${hostport#*]}"
    port="${rest#:}"
else
    host="${hostport%%:*}"
    port=""
    [[ "$hostport" == *:* ]] && port="${hostport##*:}"
fi
host="${host:-localhost}"
port="${port:-$default_port}"
[[ "$port" =~ ^[0-9]+$ ]] || die "cannot read a port number out of AMQP_URL (got '$port')"

case "$host" in
    127.0.0.1 | localhost | ::1) local_host=1 ;;
    *) local_host=0 ;;
esac

# --- remote broker: wait only ---------------------------------------------------
if ((local_host == 0)); then
    log "waiting up to ${BROKER_WAIT_SECS}s for remote broker $host:$port"
    if wait_port "$host" "$port" "$BROKER_WAIT_SECS"; then
        log "broker at $host:$port answers"
        exit 0
    fi
    die "no broker answers at $host:$port (from AMQP_URL) after ${BROKER_WAIT_SECS}s.
  This script never starts brokers for remote URLs: start that broker, or unset AMQP_URL
  to use a local one (amqp://guest:guest@127.0.0.1:5672/%2f)."
fi

# --- local broker helpers -----------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1; }

# Management checks go to the same loopback address family as the broker.
mgmt_host=127.0.0.1
[[ "$host" == "::1" ]] && mgmt_host=::1

wait_management() {
    if wait_port "$mgmt_host" "$MGMT_PORT" 60; then
        log "management UI answers at http://$host:$MGMT_PORT/"
    else
        warn "management port $MGMT_PORT does not answer after 60s (tests that read queue stats may fail)"
    fi
}

wait_amqp_or_die() {
    if ! wait_port "$host" "$port" "$BROKER_WAIT_SECS"; then
        die "the broker is running but nothing answers at $host:$port after ${BROKER_WAIT_SECS}s.
  Check its listeners (listeners.tcp.* in /etc/rabbitmq/rabbitmq.conf) and /var/log/rabbitmq/."
    fi
    log "broker answers at $host:$port"
}

# await_local_node: wait (bounded) for the local node's RabbitMQ application to be up.
await_local_node() {
    local deadline=$((SECONDS + 120))
    # Right after a start the node may not be registered yet and await_startup fails
    # at once, so retry it until the deadline.
    until timeout 60 rabbitmqctl -q await_startup >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "the local RabbitMQ node did not finish starting within 120s; see /var/log/rabbitmq/"
        fi
        sleep 1
    done
    log "local RabbitMQ node is up"
}

# ensure_management_online: the broker answers; turn the management plugin on in the
# running local node if its port is closed. Best effort: only warns on failure.
ensure_management_online() {
    if port_open "$mgmt_host" "$MGMT_PORT"; then
        log "management answers at :$MGMT_PORT"
        return 0
    fi
    if ! have rabbitmq-plugins || ! is_root; then
        warn "management port $MGMT_PORT does not answer and this script cannot enable the plugin here (needs root and rabbitmq-plugins)"
        return 0
    fi
    log "enabling rabbitmq_management"
    if timeout 60 rabbitmq-plugins -q enable --online rabbitmq_management >/dev/null 2>&1; then
        wait_management
    else
        warn "could not enable rabbitmq_management on the local node (is this broker run by something else, e.g. a container?)"
    fi
}

start_local_rabbitmq() {
    is_root || die "nothing answers at $host:$port; rabbitmq-server is installed, but only root can
  inspect or start it. If it is stopped, run: sudo systemctl start rabbitmq-server
  (or: sudo rabbitmq-server -detached). If it listens elsewhere, fix AMQP_URL."
    if timeout 15 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
        # The Erlang node is up: it is either still booting, or its RabbitMQ
        # application was stopped (`rabbitmqctl stop_app`), which only start_app undoes.
        local booting
        booting="$(timeout 15 rabbitmq-diagnostics -q is_booting 2>/dev/null || true)"
        if ! timeout 15 rabbitmq-diagnostics -q check_running >/dev/null 2>&1 &&
            [[ "$booting" != *" is booting"* ]]; then
            log "local RabbitMQ node is up but its application is stopped; rabbitmqctl start_app"
            timeout 120 rabbitmqctl -q start_app >/dev/null ||
                warn "rabbitmqctl start_app failed"
        else
            log "local RabbitMQ node is running but $host:$port does not answer yet; waiting"
        fi
    else
        # Offline: writes the enabled_plugins file, takes effect when the node boots.
        if ! timeout 60 rabbitmq-plugins -q enable --offline rabbitmq_management >/dev/null 2>&1; then
            warn "could not enable rabbitmq_management (offline); continuing without it"
        fi
        if [[ -d /run/systemd/system ]] && have systemctl; then
            log "starting rabbitmq-server (systemctl)"
            systemctl start rabbitmq-server
        else
            log "starting rabbitmq-server -detached"
            rabbitmq-server -detached
        fi
    fi
    await_local_node
    wait_amqp_or_die
    ensure_management_online
}

start_docker_rabbitmq() {
    if docker container inspect "$DOCKER_NAME" >/dev/null 2>&1; then
        log "starting existing container $DOCKER_NAME"
        docker start "$DOCKER_NAME" >/dev/null
    else
        log "running container $DOCKER_NAME from $DOCKER_IMAGE"
        docker run -d --name "$DOCKER_NAME" \
            -p "127.0.0.1:$port:5672" -p "127.0.0.1:$MGMT_PORT:15672" \
            "$DOCKER_IMAGE" >/dev/null
    fi
    # The image's first boot takes a while; give it longer than the usual wait.
    if ! wait_port "$host" "$port" 120; then
        die "container $DOCKER_NAME started but $host:$port does not answer after 120s; see: docker logs $DOCKER_NAME"
    fi
    log "broker answers at $host:$port"
    wait_management
}

# --- local broker: already answering -----------------------------------------------
if port_open "$host" "$port"; then
    log "broker answers at $host:$port"
    ensure_management_online
    exit 0
fi

# --- local broker: nothing answers ---------------------------------------------------
log "nothing answers at $host:$port"

if have rabbitmq-server; then
    start_local_rabbitmq
    exit 0
fi

if is_root && have apt-get && [[ -f /etc/debian_version ]]; then
    log "installing rabbitmq-server with apt-get"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >&2
    # The package's postinst may already have started it (on systemd hosts).
    if port_open "$host" "$port"; then
        await_local_node
        ensure_management_online
    else
        start_local_rabbitmq
    fi
    exit 0
fi

if have docker && docker info >/dev/null 2>&1; then
    start_docker_rabbitmq
    exit 0
fi

die "no RabbitMQ broker answers at $host:$port and this script cannot start one.
  Do one of:
    - install RabbitMQ: sudo apt-get install rabbitmq-server   (Debian/Ubuntu; or see rabbitmq.com/download.html)
      then: sudo rabbitmq-plugins enable rabbitmq_management
    - start a container: docker run -d --name $DOCKER_NAME -p 5672:5672 -p 15672:15672 $DOCKER_IMAGE
    - point AMQP_URL at a running broker, e.g. AMQP_URL=amqp://user:pass@broker-host:5672/%2f"
