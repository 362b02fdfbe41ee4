//! How a worker runs ([`WorkerSettings`]) and why it can stop on its own ([`WorkerError`]).

use std::time::Duration;

use warren_shared::broker::{self, BrokerError, BrokerSettings};
use warren_shared::{Policy, envelope, topology};

use crate::cron::{Schedule, ScheduleError};
use crate::events::EventSettings;

/// The default of [`WorkerSettings::max_result_bytes`]: 8 MiB, twice the default body limit and
/// half of RabbitMQ 4's default `max_message_size`, so that an oversized result is refused by
/// the worker with a clear `too_large` rather than by the broker.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 8 * 1024 * 1024;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Where the broker is (one address or several), and how to reconnect to it.
    pub broker: BrokerSettings,
    /// The work queue to consume.
    pub queue: String,
    /// Tasks run at once; also the consumer's prefetch.
    pub concurrency: u16,
    /// Attempts, backoff and time limit of functions registered without a policy of their own.
    /// Keep the time limit well below RabbitMQ's `consumer_timeout` (30 minutes by default),
    /// past which the broker closes the consuming channel.
    pub policy: Policy,
    /// Larger bodies are refused as `too_large` without being parsed.
    pub max_body_bytes: usize,
    /// Largest result (its JSON text) a handler may return; a larger one is not published: the
    /// task fails for good as `too_large`. A task with nobody waiting (no reply address) is
    /// not bound by it: its result is dropped. The default, [`DEFAULT_MAX_RESULT_BYTES`], keeps a
    /// reply well inside the broker's `max_message_size` (16 MiB by default on RabbitMQ 4).
    pub max_result_bytes: usize,
    /// On shutdown, how long in-flight tasks may take to finish before they are handed back.
    pub shutdown_grace: Duration,
    /// Bound on publishing one reply, retry or dead letter, confirm included.
    pub publish_timeout: Duration,
    /// How often the watchdog checks that an idle worker is not starving next to ready tasks.
    pub watchdog_interval: Duration,
    /// How this process appears in the management UI (`warren-worker@host:pid`).
    pub name: String,
    /// The exchange through which callers reach functions by name
    /// ([`topology::FUNCTIONS_EXCHANGE`] unless a deployment keeps its functions apart). The
    /// worker claims every function it serves for its queue there at start-up, and fails to
    /// start with [`WorkerError::FunctionClaimed`] when another queue owns one. Empty: claim
    /// nothing (the queue is reached by its name only, as a bulk queue next to an interactive
    /// one would be).
    pub functions_exchange: String,
    /// The queues replies may go to besides direct reply-to addresses: patterns in which `*`
    /// stands for any run of characters (Warren's own reply queues, `warren.reply.*`, by
    /// default). A task whose `reply_to` names another queue is rejected as `bad_request`,
    /// parked, and not run, so that a caller cannot make the worker publish into any queue of
    /// the virtual host. Empty: direct reply-to only; `*`: any queue.
    pub reply_queues: Vec<String>,
    /// The task events this worker appends to the event stream (on by default; see
    /// [`crate::events`] and docs/protocol.md, "Task events").
    pub events: EventSettings,
    /// Cron schedules ([`crate::cron`]): with any, the worker joins the election of the cron
    /// leader, and fires them while it leads. None by default.
    pub schedules: Vec<Schedule>,
    /// How often the cron leader renews its baton
    /// ([`warren_shared::election::DEFAULT_RENEW_EVERY`]; keep it below `consumer_timeout`).
    pub election_renew_every: Duration,
    /// The stream that records fired ticks ([`crate::cron::LOG_STREAM`]).
    pub cron_log: String,
    /// The election role of the cron leader ([`crate::cron::ROLE`]): every worker of a virtual
    /// host with schedules must use the same one (tests give each their own).
    pub cron_role: String,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            broker: BrokerSettings::default(),
            queue: topology::DEFAULT_QUEUE.to_owned(),
            concurrency: 16,
            policy: Policy::default(),
            max_body_bytes: 4 * 1024 * 1024,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            shutdown_grace: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            watchdog_interval: Duration::from_secs(10),
            name: broker::process_name("warren-worker"),
            functions_exchange: topology::FUNCTIONS_EXCHANGE.to_owned(),
            reply_queues: vec![format!("{}*", envelope::REPLY_QUEUE_PREFIX)],
            events: EventSettings::default(),
            schedules: Vec::new(),
            election_renew_every: warren_shared::election::DEFAULT_RENEW_EVERY,
            cron_log: crate::cron::LOG_STREAM.to_owned(),
            cron_role: crate::cron::ROLE.to_owned(),
        }
    }
}

/// Why a worker stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The settings cannot work.
    #[error("invalid worker settings: {0}")]
    Settings(String),
    /// Connecting or declaring failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A `[[schedule]]` table cannot work (a bad expression, zone, name...).
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The worker cannot take part in the election of the cron leader (a 403 names the
    /// permission on `warren.leader.cron`).
    #[error(transparent)]
    Election(#[from] warren_shared::election::ElectionError),
    /// The consumer could not be re-established within the configured reconnect attempts.
    /// The process should exit non-zero so its supervisor restarts it.
    #[error("gave up consuming {queue:?} after {attempts} attempts: {reason}")]
    GaveUp {
        /// The queue consumed.
        queue: String,
        /// Rebuild attempts made.
        attempts: usize,
        /// The last error.
        reason: String,
    },
    /// The worker's supervisor panicked (a bug in Warren): the worker is gone. Exit non-zero.
    #[error("the worker's supervisor panicked: {0}")]
    Panicked(String),
    /// The work queue exists with other arguments than Warren declares (for example a plain
    /// classic queue another application created): the worker cannot use it.
    #[error(
        "queue {queue:?} already exists with other arguments: {detail}. Warren needs it as \
         declared by topology::declare (a quorum queue with a dead-letter queue); move the \
         other application to another name, or delete the queue if nothing needs its \
         messages: `rabbitmqctl delete_queue {queue}`"
    )]
    QueueMismatch {
        /// The work queue.
        queue: String,
        /// What the broker said, naming the differing argument.
        detail: String,
    },
    /// A function this worker serves is routed to another queue: a task sent by function name
    /// goes to exactly one queue, so two queues cannot both serve it by name.
    #[error(
        "function {function:?} is already served by queue {owner:?}, not {queue:?}: a function \
         named by callers is routed to one queue. Serve it from {owner:?}, stop serving it here, \
         or, if nothing serves it there any more, free it: `warren functions release \
         {function}` (with this worker's --functions-exchange) deletes the exchange \
         {exchange:?}; `warren functions` lists every function's queue"
    )]
    FunctionClaimed {
        /// The function.
        function: String,
        /// This worker's queue.
        queue: String,
        /// The queue that owns the function.
        owner: String,
        /// The function's exchange, which records the owner.
        exchange: String,
    },
    /// The event stream cannot be used: missing while this worker may not declare it, or a
    /// queue of its name that is not a stream. A worker never runs tasks whose events it
    /// could not append.
    #[error(
        "the event stream {stream:?} cannot be used: {problem}. Declare it (start a worker \
         whose broker user has `configure` permission on it once, see deploy/rabbitmq/users.sh), \
         point this worker at the stream its deployment uses (--events-stream), or turn task \
         events off for this worker (--events off)"
    )]
    EventStream {
        /// The stream's name.
        stream: String,
        /// What is wrong with it.
        problem: String,
    },
}
