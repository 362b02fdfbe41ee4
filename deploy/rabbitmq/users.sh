#!/usr/bin/env bash
# users.sh: create a RabbitMQ user with the least permissions one Warren role needs.
#
#   deploy/rabbitmq/users.sh ROLE USER [QUEUE] [VHOST]
#
#   ROLE   producer  `warren call|enqueue`, warren-gateway, warren_client::Client run with
#                    --no-declare (WARREN_NO_DECLARE=true, ClientSettings::declare = false):
#                    publish to the `warren` exchange, receive replies by direct reply-to.
#                    No configure permission: a worker (or this script's `worker` user, or an
#                    operator) must have declared the queue first.
#          worker    warren-worker: declare its queues, consume the work queue, publish replies,
#                    retries and delays.
#          operator  `warren dlq list|replay|purge` and the management UI (tag `monitoring`):
#                    read the dead-letter queue, publish replays.
#   USER   the user name. The password is read from the file named by WARREN_USER_PASSWORD_FILE
#          (first line), or from standard input, never from this script's arguments.
#   QUEUE  the work queue (default warren.tasks); the regexes below cover it, its `.dead` queue
#          and its `.delay.<delay>` queues.
#   VHOST  default /.
#   WARREN_FUNCTIONS_EXCHANGE (environment) the exchange that routes by function name, as the
#          binaries take it (default warren.functions; docs/protocol.md §1a).
#
# Runs rabbitmqctl (RABBITMQCTL overrides the command, e.g. "sudo rabbitmqctl" or
# "docker exec rabbit rabbitmqctl"). rabbitmqctl 3.10 takes the password as an argument, so it
# is briefly visible in the broker host's process list while the user is created. Safe to run
# again: an existing user gets its password and permissions reset.
#
# The permissions (regexes over exchange and queue names, see https://www.rabbitmq.com/access-control.html):
#
#   role      configure                                  write                               read
#   producer  ^$                                         ^(warren|F)$                        ^$
#   worker    ^(warren|F|F\..+|Q|Q\.dead|Q\.delay\..+)$  ^(warren|amq\.default|Q|F\..+)$     ^(warren|F|F\..+|Q)$
#   operator  ^$                                         ^warren$                            ^Q\.dead$
#
# (Q is the work queue and F the functions exchange, dots escaped.) Why each one:
#   producer write warren, F   publishing a task to a queue (`warren`) or by function name (F)
#   worker configure ...       declaring the exchanges, its function exchanges (F.<function>),
#                              the work, dead-letter and delay queues
#   worker write warren, Q     retrying at once through `warren`; binding Q to `warren` and to
#                              its function exchanges
#   worker write F.<function>  binding a function exchange from F (claiming the function)
#   worker write amq.default   replies, delayed retries and parked tasks (default exchange)
#   worker read warren, F, Q   binding (read on the source exchange) and consuming Q
#   operator read Q.dead       listing, replaying and purging parked tasks
#   operator write warren      replaying them to the work queue
#   operator tag monitoring    the management UI, showing every connection, channel and queue
# Direct reply-to (`amq.rabbitmq.reply-to`) needs no permission. A producer using a reply queue
# of its own (ReplyMode::Queue) also needs configure and read on ^warren\.reply\..+$.
set -euo pipefail

die() { echo "users.sh: $*" >&2; exit 2; }
[[ $# -ge 2 && $# -le 4 ]] || die "usage: users.sh producer|worker|operator USER [QUEUE] [VHOST]"
role="$1"; user="$2"; queue="${3:-warren.tasks}"; vhost="${4:-/}"
functions="${WARREN_FUNCTIONS_EXCHANGE:-warren.functions}"
read -r -a ctl <<< "${RABBITMQCTL:-rabbitmqctl}"

if [[ -n "${WARREN_USER_PASSWORD_FILE:-}" ]]; then
    IFS= read -r password < "$WARREN_USER_PASSWORD_FILE" || true
else
    IFS= read -r password || true
fi
[[ -n "${password:-}" ]] || die "no password (WARREN_USER_PASSWORD_FILE or standard input)"

q="${queue//./\\.}"; f="${functions//./\\.}"
case "$role" in
    producer) configure='^$'; write="^(warren|$f)\$"; read_='^$'; tags='' ;;
    worker)   configure="^(warren|$f|$f\\..+|$q|$q\\.dead|$q\\.delay\\..+)\$"
              write="^(warren|amq\\.default|$q|$f\\..+)\$"; read_="^(warren|$f|$f\\..+|$q)\$"; tags='' ;;
    operator) configure='^$'; write='^warren$'; read_="^$q\\.dead\$"; tags='monitoring' ;;
    *) die "unknown role '$role' (producer, worker or operator)" ;;
esac

if "${ctl[@]}" --quiet list_users | awk '{print $1}' | grep -qxF -- "$user"; then
    "${ctl[@]}" --quiet change_password "$user" "$password"
else
    "${ctl[@]}" --quiet add_user "$user" "$password"
fi
"${ctl[@]}" --quiet set_permissions -p "$vhost" "$user" "$configure" "$write" "$read_"
# shellcheck disable=SC2086 # no tags: clears them
"${ctl[@]}" --quiet set_user_tags "$user" $tags
echo "users.sh: $user ($role) on vhost $vhost: configure '$configure' write '$write' read '$read_'${tags:+ tags $tags}"
