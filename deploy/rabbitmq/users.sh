#!/usr/bin/env bash
# users.sh: give a RabbitMQ user a password and the least permissions one Warren role needs.
#
#   deploy/rabbitmq/users.sh ROLE USER [QUEUE] [VHOST]
#
#   ROLE   producer  `warren call|enqueue`, warren-gateway, warren_client::Client run with
#                    --no-declare (WARREN_NO_DECLARE=true, ClientSettings::declare = false):
#                    publish to the `warren` exchange or by function name, receive replies by
#                    direct reply-to. No configure permission: a worker (or an operator) must
#                    have declared the queue first.
#          worker    warren-worker: declare its queues, claim its functions, consume the work
#                    queue, publish replies, retries and delays.
#          operator  `warren dlq list|replay|purge`, `warren functions [release]`, `warren
#                    status` and the management UI (tag `monitoring`): read the dead-letter
#                    queue, publish replays, release function claims.
#   USER   the user name. The password is read from the file named by WARREN_USER_PASSWORD_FILE
#          (first line), or from standard input, never from this script's arguments.
#   QUEUE  the work queue (default warren.tasks); the permissions cover it, its `.dead` queue
#          and its `.delay.<delay>` queues (the delay queues of retries).
#   VHOST  default /.
#   WARREN_FUNCTIONS_EXCHANGE (environment) the exchange that routes by function name, as the
#          binaries take it (default warren.functions; docs/protocol.md §1a).
#   WARREN_EVENTS_STREAM (environment) the task event stream, as the binaries take it (default
#          warren.events; docs/protocol.md, "Task events").
#
# The permissions and tags of each role are those of its user in definitions.json next to this
# script (WARREN_DEFINITIONS names another file), the one place they are written down:
# producer warren-app, worker warren-worker, operator warren-ops. Their regexes are for the queue
# warren.tasks, the functions exchange warren.functions and the event stream warren.events; this
# script puts QUEUE, WARREN_FUNCTIONS_EXCHANGE and WARREN_EVENTS_STREAM in their place. So
# `users.sh worker warren-worker warren.tasks warren` gives the user imported from the
# definitions its password and exactly the file's permissions.
#
# Runs rabbitmqctl (RABBITMQCTL overrides the command, e.g. "sudo rabbitmqctl" or
# "docker exec rabbit rabbitmqctl"). rabbitmqctl 3.10 takes the password as an argument, so it
# is briefly visible in the broker host's process list while the user is created. Safe to run
# again: an existing user gets its password and permissions reset.
#
# Why each permission of definitions.json (Q is the work queue and F the functions exchange,
# dots escaped; see https://www.rabbitmq.com/access-control.html):
#   producer write warren, F   publishing a task to a queue (`warren`) or by function name (F)
#   worker configure ...       declaring the exchanges, its function exchanges (F.<function>),
#                              the work, dead-letter and delay queues (Q.delay.<delay>)
#   worker write warren, Q     retrying at once through `warren`; binding Q to `warren` and to
#                              its function exchanges
#   worker write F.<function>  binding a function exchange from F (claiming the function)
#   worker write amq.default   replies, delayed retries, parked tasks and task events (default
#                              exchange)
#   worker configure warren.events  declaring the task event stream (appending goes through
#                              the default exchange: no write permission on the stream itself)
#   worker read warren, F, Q   binding (read on the source exchange) and consuming Q
#   worker read Q.delay.*      declaring a queue that dead-letters (a delay queue dead-letters
#                              back to Q) needs read on it, and write on amq.default
#   worker configure, read warren.leader.*  the elections of elected roles (the cron leader):
#                              declaring and consuming warren.leader.<role> (batons are
#                              published through the default exchange)
#   worker configure, read warren.cron.log  declaring and reading the log of fired schedule
#                              ticks (appended through the default exchange)
#   worker write F             the cron leader sending a schedule's task by function name
#   worker all warren.run-at, warren.run-at.*  declaring the delay levels of tasks that run at
#                              a time, binding Q and its functions to them, deferring a task that
#                              came early (shared by every queue of the virtual host)
#   producer write warren.run-at.27  sending a task that runs at a time
#   producer read warren.events  reading the task event stream: `warren result`, `warren
#                              events`, the gateway's results and resume (GET /api/tasks/<id>,
#                              websocket {"result"} and {"resume"})
#   operator read Q.dead       listing, replaying and purging parked tasks
#   operator read warren.run-at.parked  reading tasks due later that nothing could route
#   operator read warren.events  `warren events` and `warren result` (what the fleet did)
#   operator write warren      replaying them to the work queue
#   operator configure F.<function>  releasing a function's claim (deleting its exchange, and
#                              the declaration by which the broker names the owner)
#   operator tag monitoring    the management API and UI (`warren functions`, `warren status`),
#                              showing every connection, channel, exchange and queue
# Direct reply-to (`amq.rabbitmq.reply-to`) needs no permission. A producer using a reply queue
# of its own (ReplyMode::Queue) also needs configure and read on ^warren\.reply\..+$.
set -euo pipefail

die() { echo "users.sh: $*" >&2; exit 2; }
[[ $# -ge 2 && $# -le 4 ]] || die "usage: users.sh producer|worker|operator USER [QUEUE] [VHOST]"
role="$1"; user="$2"; queue="${3:-warren.tasks}"; vhost="${4:-/}"
functions="${WARREN_FUNCTIONS_EXCHANGE:-warren.functions}"
events="${WARREN_EVENTS_STREAM:-warren.events}"
read -r -a ctl <<< "${RABBITMQCTL:-rabbitmqctl}"

if [[ -n "${WARREN_USER_PASSWORD_FILE:-}" ]]; then
    IFS= read -r password < "$WARREN_USER_PASSWORD_FILE" || true
else
    IFS= read -r password || true
fi
[[ -n "${password:-}" ]] || die "no password (WARREN_USER_PASSWORD_FILE or standard input)"

defs="${WARREN_DEFINITIONS:-$(dirname "${BASH_SOURCE[0]}")/definitions.json}"
[[ -r "$defs" ]] || die "cannot read $defs (the roles' permissions are read from it)"
case "$role" in
    producer) template_user=warren-app ;;
    worker)   template_user=warren-worker ;;
    operator) template_user=warren-ops ;;
    *) die "unknown role '$role' (producer, worker or operator)" ;;
esac
# definitions.json has one user and one permission entry per line; its regexes escape only
# backslashes (\\ in JSON).
user_line="$(grep -F "\"name\": \"$template_user\"," "$defs")" || die "$defs: no user $template_user"
perm_line="$(grep -F "\"user\": \"$template_user\"," "$defs")" || die "$defs: no permissions for $template_user"
# field NAME: the permission NAME of the template user, with QUEUE, the functions exchange and
# the event stream.
q="${queue//./\\.}"; f="${functions//./\\.}"; e="${events//./\\.}"
field() {
    local value
    value="$(sed -E -n "s/.*\"$1\": \"([^\"]*)\".*/\1/p" <<< "$perm_line" | sed 's/\\\\/\\/g')"
    value="${value//'warren\.tasks'/"$q"}"
    value="${value//'warren\.events'/"$e"}"
    printf '%s' "${value//'warren\.functions'/"$f"}"
}
configure="$(field configure)"; write="$(field write)"; read_="$(field read)"
[[ -n "$configure" && -n "$write" && -n "$read_" ]] || die "$defs: cannot read the permissions of $template_user"
tags="$(sed -E -n 's/.*"tags": \[([^]]*)\].*/\1/p' <<< "$user_line" | tr -d '" ' | tr ',' ' ')"

if "${ctl[@]}" --quiet list_users | awk '{print $1}' | grep -qxF -- "$user"; then
    "${ctl[@]}" --quiet change_password "$user" "$password"
else
    "${ctl[@]}" --quiet add_user "$user" "$password"
fi
"${ctl[@]}" --quiet set_permissions -p "$vhost" "$user" "$configure" "$write" "$read_"
# shellcheck disable=SC2086 # no tags: clears them
"${ctl[@]}" --quiet set_user_tags "$user" $tags
echo "users.sh: $user ($role) on vhost $vhost: configure '$configure' write '$write' read '$read_'${tags:+ tags $tags}"
