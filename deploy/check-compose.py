#!/usr/bin/env python3
"""check-compose.py: checks deploy/docker-compose.yml without a Docker engine.

    python3 check-compose.py [--self-test] [COMPOSE_FILE]

1. Debian's `docker-compose` (1.29, the older of the two tools the file must work with)
   parses and validates the file against its Compose Specification schema
   (`docker-compose config`, which needs no engine), with a throw-away password.
2. Rules on the configuration it resolved:
   - the file has no top-level `name:` or `version:` (docker-compose 1.29 refuses `name:`;
     the Compose plugin warns about `version:`);
   - every published port is bound to a loopback address (127.0.0.1 or ::1), never to all
     interfaces;
   - the broker has a user of its own (RABBITMQ_DEFAULT_USER set and not guest, a password
     that comes from a variable), and no AMQP URL logs in as guest;
   - without WARREN_BROKER_PASSWORD, `docker-compose config` refuses the file.

--self-test runs the same checks on broken copies of the file (a port on all interfaces, one
on 0.0.0.0, the guest user, a top-level name, a hard-coded password) and fails unless each is
refused. Needs PyYAML and the `docker-compose` command.
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

HERE = pathlib.Path(__file__).resolve().parent
LOOPBACK = {"127.0.0.1", "::1", "[::1]"}
TEST_PASSWORD = "compose-check-password"


def compose_config(path, password):
    """(exit status, output) of `docker-compose config` on `path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARREN_")}
    if password is not None:
        env["WARREN_BROKER_PASSWORD"] = password
    # An .env beside the file would feed the variables: run on a copy in a fresh directory.
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp) / "docker-compose.yml"
        copy.write_text(path.read_text())
        (pathlib.Path(tmp) / "rabbitmq").mkdir()
        (pathlib.Path(tmp) / "rabbitmq" / "rabbitmq.conf").write_text("")
        done = subprocess.run(
            ["docker-compose", "--project-directory", tmp, "-f", str(copy), "config"],
            env=env, capture_output=True, text=True, check=False,
        )
    return done.returncode, done.stdout + done.stderr


def port_host(port):
    """The host address a published port binds, "" for all interfaces, None if unpublished."""
    if isinstance(port, dict):
        if "published" not in port:
            return None
        return port.get("host_ip", "")
    text = str(port).split("/")[0]
    if text.startswith("["):  # [::1]:5672:5672
        return text[: text.index("]") + 1]
    parts = text.split(":")
    if len(parts) == 1:
        return ""  # "5672": a random host port on all interfaces
    if len(parts) == 2:
        return ""  # "5672:5672"
    return ":".join(parts[:-2])


def problems(path):
    """What is wrong with the compose file at `path`, as strings."""
    found = []
    raw = yaml.safe_load(path.read_text())
    for key in ("name", "version"):
        if key in raw:
            found.append("top-level `%s:` (docker-compose 1.29 or the Compose plugin objects)" % key)
    status, output = compose_config(path, TEST_PASSWORD)
    if status != 0:
        return found + ["docker-compose config refuses it: %s" % output.strip()]
    config = yaml.safe_load(output)
    for name, service in config.get("services", {}).items():
        for port in service.get("ports", []):
            host = port_host(port)
            if host is not None and host not in LOOPBACK:
                found.append("service %s publishes %s on %s" % (
                    name, port, host or "all interfaces"))
        env = service.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        if "RABBITMQ_DEFAULT_USER" in (raw["services"][name].get("environment") or {}) or \
                "rabbitmq" in str(service.get("image", "")):
            user = env.get("RABBITMQ_DEFAULT_USER")
            if not user or user == "guest":
                found.append("service %s: the broker's user is %s" % (name, user or "guest (unset)"))
            raw_pass = str((raw["services"][name].get("environment") or {}).get(
                "RABBITMQ_DEFAULT_PASS", ""))
            if "${" not in raw_pass:
                found.append("service %s: RABBITMQ_DEFAULT_PASS is not taken from a variable" % name)
        for key, value in env.items():
            if re.search(r"amqps?://guest[:@]", str(value)):
                found.append("service %s: %s logs in as guest" % (name, key))
    status, _ = compose_config(path, None)
    if status == 0:
        found.append("docker-compose config accepts the file without WARREN_BROKER_PASSWORD")
    return found


def breakages(text):
    """(what, the compose text broken that way) for --self-test."""
    return [
        ("a port on all interfaces", text.replace('"127.0.0.1:5672:5672"', '"5672:5672"')),
        ("a port on 0.0.0.0", text.replace('"127.0.0.1:15672:15672"', '"0.0.0.0:15672:15672"')),
        ("the guest user", text.replace("${WARREN_BROKER_USER:-warren}", "guest")),
        ("a top-level name", "name: warren\n" + text),
        ("a hard-coded password", re.sub(r'RABBITMQ_DEFAULT_PASS: "[^"]*"',
                                         'RABBITMQ_DEFAULT_PASS: "secret"', text)),
    ]


def main():
    args = [a for a in sys.argv[1:] if a != "--self-test"]
    path = pathlib.Path(args[0]) if args else HERE / "docker-compose.yml"
    found = problems(path)
    for problem in found:
        print("FAIL %s: %s" % (path.name, problem))
    if "--self-test" not in sys.argv:
        print("%s: %s" % (path.name, "passes" if not found else "%d problems" % len(found)))
        return 1 if found else 0
    if found:
        return 1
    missed = 0
    text = path.read_text()
    for what, broken_text in breakages(text):
        if broken_text == text:
            print("NOT APPLIED (the file changed?): %s" % what)
            missed += 1
            continue
        with tempfile.TemporaryDirectory() as tmp:
            broken = pathlib.Path(tmp) / "docker-compose.yml"
            broken.write_text(broken_text)
            refused = problems(broken)
        if refused:
            print("refused as it should be: %s (%s)" % (what, refused[0]))
        else:
            print("NOT REFUSED: %s" % what)
            missed += 1
    total = len(breakages(text))
    print("self-test: %d of %d breakages refused" % (total - missed, total))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
