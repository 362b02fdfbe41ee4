#!/usr/bin/env bash
# check-deploy.sh: checks the deployment files that no test runs for real (there is no
# Kubernetes cluster, Docker engine or systemd PID 1 on CI); deploy/test.sh calls it.
#
#   - deploy/kubernetes/*.yaml: every manifest against the Kubernetes schemas (strict) and
#     the CRD schemas in deploy/kubernetes/schemas/, plus the references between them
#     (deploy/kubernetes/validate.py, then its --self-test: broken manifests must be refused);
#   - deploy/docker-compose.yml: parsed and validated by Debian's docker-compose 1.29, ports on
#     loopback only, a broker user that is not guest (deploy/check-compose.py, and --self-test);
#   - deploy/systemd/warren-worker@.service: `systemd-analyze verify` with no complaint, and an
#     ExecStart= without flags (the e2e test deploy::systemd_unit_* runs the worker the way
#     the unit does).
#
# Tools: kubernetes-validate from PyPI in a virtualenv under ~/.cache/warren-deploy-tools (made
# once per machine, remade when the pinned version changes),
# Debian's docker-compose and systemd packages (installed as root when missing). Outside CI a
# tool that cannot be had skips its check with a warning; with CI=true it fails the run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/warren-deploy-tools"
# The version whose bundled schemas the manifests were checked with; bump deliberately.
KUBERNETES_VALIDATE_VERSION="1.37.0"
failed=0

say() { echo "check-deploy: $*" >&2; }
# missing TOOL WHY: a tool could not be had; fatal on CI, a warning elsewhere.
missing() {
    if [ "${CI:-}" = "true" ]; then
        say "error: $1 is needed for $2 and could not be installed"
        exit 1
    fi
    say "warning: $1 missing, $2 not checked"
}
# apt_install PACKAGE: Debian's PACKAGE, as root.
apt_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    say "installing Debian's $1"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "$1" >/dev/null; }
}
# run_check NAME COMMAND...: runs a check, remembers a failure, goes on with the next.
run_check() {
    local name="$1"
    shift
    if "$@"; then
        say "$name: passed"
    else
        say "$name: FAILED"
        failed=1
    fi
}

# --- Python with kubernetes-validate (and PyYAML, which the compose check uses too) -----------
PY="$TOOLS/venv/bin/python"
if ! "$PY" -c "import kubernetes_validate, yaml" >/dev/null 2>&1 \
    || [ "$("$PY" -c 'import kubernetes_validate.version as v; print(v.__version__)' 2>/dev/null)" \
        != "$KUBERNETES_VALIDATE_VERSION" ]; then
    say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION in $TOOLS/venv"
    mkdir -p "$TOOLS"
    { python3 -m venv "$TOOLS/venv" \
        && "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"; } >&2 || true
fi
if "$PY" -c "import kubernetes_validate, yaml" >/dev/null 2>&1; then
    run_check "kubernetes manifests" "$PY" deploy/kubernetes/validate.py
    run_check "kubernetes validator self-test" "$PY" deploy/kubernetes/validate.py --self-test
else
    missing kubernetes-validate "deploy/kubernetes"
fi

# --- docker-compose.yml --------------------------------------------------------------------------
command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose || true
if command -v docker-compose >/dev/null 2>&1 && "$PY" -c "import yaml" >/dev/null 2>&1; then
    run_check "compose file" "$PY" deploy/check-compose.py --self-test
else
    missing docker-compose "deploy/docker-compose.yml"
fi

# --- systemd unit --------------------------------------------------------------------------------
UNIT="deploy/systemd/warren-worker@.service"
check_unit_flags() {
    local exec
    exec="$(grep -E '^ExecStart=' "$UNIT")"
    if [ "$exec" != "ExecStart=/usr/local/bin/warren-worker" ]; then
        say "$UNIT: ExecStart= must pass no flags (settings come from the environment files): $exec"
        return 1
    fi
}
# verify_unit FILE: systemd-analyze verify on an instance of FILE, with ExecStart= pointed at an
# executable that exists here; any message (it exits 0 on unknown keys) is a failure.
verify_unit() {
    local dir out
    dir="$(mktemp -d)"
    sed 's#^ExecStart=/usr/local/bin/warren-worker#ExecStart=/bin/true#' "$1" >"$dir/warren-worker@.service"
    out="$(cd "$dir" && systemd-analyze verify ./warren-worker@warren.tasks.service 2>&1)" || true
    rm -rf "$dir"
    if [ -n "$out" ]; then
        echo "$out" >&2
        return 1
    fi
}
verify_unit_self_test() {
    local broken
    broken="$(mktemp)"
    sed 's/^TimeoutStopSec=/TimeoutStopSecs=/' "$UNIT" >"$broken"
    if verify_unit "$broken" 2>/dev/null; then
        say "systemd-analyze did not refuse a misspelt key"
        rm -f "$broken"
        return 1
    fi
    rm -f "$broken"
}
run_check "systemd unit flags" check_unit_flags
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd || true
if command -v systemd-analyze >/dev/null 2>&1; then
    run_check "systemd unit" verify_unit "$UNIT"
    run_check "systemd verify self-test" verify_unit_self_test
else
    missing systemd-analyze "$UNIT"
fi

if [ "$failed" != 0 ]; then
    say "some deployment checks FAILED (see above)"
    exit 1
fi
say "all deployment checks passed"
