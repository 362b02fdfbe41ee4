//! Exchange and queue names, and the idempotent declaration that producers and workers share.
//!
//! For a work queue `Q` (default [`DEFAULT_QUEUE`]):
//!
//! | name | what |
//! |---|---|
//! | exchange [`EXCHANGE`] | durable direct exchange; `Q` is bound to it with routing key `Q` |
//! | `Q` | durable quorum queue; `x-delivery-limit` guards against crash loops; dead-letters to `Q.dead` |
//! | `Q.dead` | durable quorum queue: tasks that will not run again, with the reason in headers |
//! | `Q.delay.<delay>` | durable quorum queue, one per backoff delay, message TTL = delay, dead-letters back to `Q`, expires when unused; nobody consumes it |
//!
//! **Routing by function.** A caller may name only a function: it publishes to the direct
//! exchange [`FUNCTIONS_EXCHANGE`] with the function as routing key (`mandatory`, so a function
//! nobody serves comes back at once as unroutable). Each worker *claims* the functions it
//! serves for its queue ([`claim_function`]): an exchange `<functions exchange>.<function>`
//! (fanout, durable, auto-delete) bound from the functions exchange by the function's name and
//! bound to the queue. The exchange records its queue in its `alternate-exchange` argument,
//! the one exchange argument RabbitMQ compares when an exchange is declared again, so a second
//! queue's claim of the same function fails (`406 inequivalent arg`) instead of routing one task
//! to two queues. Deleting the queue removes its binding, the function's exchange deletes itself,
//! and the claim is free again.
//!
//! Each delay has a queue of its own, so every message in it expires in arrival order: no retry
//! waits behind a longer one (per-message TTLs in one queue would block at the head). A delay
//! queue expires ([`retry_queue_expires`]) once nobody has declared it for longer than any of its
//! messages can wait, so the tiers nobody uses any more disappear; a worker redeclares a tier at
//! least every [`REDECLARE_RETRY_QUEUE_EVERY`] while it publishes to it. (Until the `x-expires`
//! argument came, delay queues were named `Q.retry.<delay>`; new names mean that the old queues,
//! declared without it, never make a declaration fail. They drain by themselves and can be
//! deleted.)
//!
//! Queue arguments are fixed when a queue is created: RabbitMQ refuses a redeclaration with other
//! arguments (`406 PRECONDITION_FAILED - inequivalent arg`). So every argument the queue will ever
//! need is declared from the start, and changing one means deleting the queue.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// The exchange tasks are published to; the routing key is the queue name.
pub const EXCHANGE: &str = "warren";

/// The exchange that routes tasks by function name, unless a deployment names another (its
/// functions then live apart from those of other deployments on the same virtual host).
pub const FUNCTIONS_EXCHANGE: &str = "warren.functions";

/// The queue producers and workers use unless told otherwise.
pub const DEFAULT_QUEUE: &str = "warren.tasks";

/// Deliveries of one message (including redeliveries after a worker crash) before the broker
/// dead-letters it: the guard against a task that kills every worker that takes it.
pub const DELIVERY_LIMIT: i64 = 10;

/// The names of the queues that belong to one work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// The work queue.
    pub work: String,
    /// Its dead-letter queue.
    pub dead: String,
}

impl QueueNames {
    /// The names for work queue `queue`.
    pub fn new(queue: &str) -> Self {
        Self {
            work: queue.to_owned(),
            dead: format!("{queue}.dead"),
        }
    }
}

/// A worker that publishes to a delay queue declares it again when its last declaration is at
/// least this old, which keeps the queue from expiring under its messages: a message published
/// within this time of a declaration expires (and goes back to the work queue) before the queue
/// can, since [`retry_queue_expires`] exceeds the delay by more than this plus a publish timeout.
pub const REDECLARE_RETRY_QUEUE_EVERY: Duration = Duration::from_secs(30);

/// The `x-expires` of the delay queue for `delay`: twice the delay plus a minute. A message
/// waits `delay` in it, so the queue outlives every message published within a minute of its
/// last declaration (see [`REDECLARE_RETRY_QUEUE_EVERY`]).
pub fn retry_queue_expires(delay: Duration) -> Duration {
    delay
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(60))
}

/// The delay queue for retries after `delay`: `<queue>.delay.1s`, `.delay.250ms`, `.delay.2m`.
pub fn retry_queue_name(queue: &str, delay: Duration) -> String {
    let ms = delay.as_millis();
    let label = if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms > 0 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    };
    format!("{queue}.delay.{label}")
}

/// Whether `name` is one of `queue`'s delay queues ([`retry_queue_name`]), or one of the
/// `<queue>.retry.<delay>` queues that older versions used for the same purpose.
pub fn is_retry_queue_of(name: &str, queue: &str) -> bool {
    name.strip_prefix(queue)
        .is_some_and(|rest| rest.starts_with(".delay.") || rest.starts_with(".retry."))
}

/// Declares the delay queue for retries of `queue` after `delay` (idempotent) and returns its
/// name. Expired messages go back to `queue` through the default exchange.
///
/// Each declaration restarts the queue's expiry clock ([`retry_queue_expires`]).
///
/// # Errors
/// The broker's error.
pub async fn declare_retry_queue(
    channel: &Channel,
    queue: &str,
    delay: Duration,
) -> Result<String, lapin::Error> {
    let name = retry_queue_name(queue, delay);
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::durable(),
            retry_queue_args(queue, delay),
        )
        .await?;
    Ok(name)
}

/// The arguments of the delay queue of `queue` for `delay`.
pub fn retry_queue_args(queue: &str, delay: Duration) -> FieldTable {
    let millis =
        |d: Duration| AMQPValue::LongLongInt(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut args = quorum_args();
    args.insert("x-message-ttl".into(), millis(delay));
    args.insert("x-expires".into(), millis(retry_queue_expires(delay)));
    dead_letter_to(&mut args, queue);
    args
}

/// Checks a queue name before it reaches the broker (which would close the channel instead).
///
/// # Errors
/// A message saying what is wrong: empty, longer than 200 bytes (room for suffixes within
/// AMQP's 255), the reserved `amq.` prefix, or control characters.
pub fn validate_queue_name(queue: &str) -> Result<(), String> {
    if queue.is_empty() {
        return Err("queue name is empty".into());
    }
    if queue.len() > 200 {
        return Err(format!(
            "queue name is {} bytes long; the limit is 200",
            queue.len()
        ));
    }
    if queue.starts_with("amq.") {
        return Err(format!(
            "queue name {queue:?} uses the reserved prefix \"amq.\""
        ));
    }
    if queue.chars().any(char::is_control) {
        return Err(format!("queue name {queue:?} contains control characters"));
    }
    Ok(())
}

/// Checks a function name before it is used as a routing key: not empty, at most
/// [`MAX_FUNCTION_NAME`] bytes (the per-function exchange name must fit AMQP's 255), no control
/// characters.
///
/// # Errors
/// A message saying what is wrong.
pub fn validate_function_name(function: &str) -> Result<(), String> {
    if function.is_empty() {
        return Err("function name is empty".into());
    }
    if function.len() > MAX_FUNCTION_NAME {
        return Err(format!(
            "function name is {} bytes long; the limit is {MAX_FUNCTION_NAME}",
            function.len()
        ));
    }
    if function.chars().any(char::is_control) {
        return Err(format!(
            "function name {function:?} contains control characters"
        ));
    }
    Ok(())
}

/// The longest function name that can be routed by name, in bytes.
pub const MAX_FUNCTION_NAME: usize = 180;

/// The exchange through which `function` reaches the queue that claimed it.
pub fn function_exchange(functions_exchange: &str, function: &str) -> String {
    format!("{functions_exchange}.{function}")
}

/// Declares the exchange that routes by function name (durable, direct). Idempotent.
///
/// # Errors
/// The broker's error.
pub async fn declare_functions_exchange(
    channel: &Channel,
    functions_exchange: &str,
) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            functions_exchange.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Claims `function` for `queue`: declares its exchange with `queue` as owner; see the
/// [module](self). Idempotent for the same queue. Nothing is routed until [`route_function`].
///
/// # Errors
/// The broker's error: a `406 inequivalent arg 'alternate-exchange'` when another queue owns
/// the function ([`claimed_by`] tells which). Such an error closes the channel.
pub async fn claim_function(
    channel: &Channel,
    functions_exchange: &str,
    function: &str,
    queue: &str,
) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(queue.into()),
    );
    channel
        .exchange_declare(
            function_exchange(functions_exchange, function)
                .as_str()
                .into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await
}

/// Gives back a claim made by [`claim_function`] that nothing was bound to yet (the exchange
/// is deleted only if it has no bindings, so an owner's routed function is never touched).
///
/// # Errors
/// The broker's error.
pub async fn release_unbound_claim(
    channel: &Channel,
    functions_exchange: &str,
    function: &str,
) -> Result<(), lapin::Error> {
    channel
        .exchange_delete(
            function_exchange(functions_exchange, function)
                .as_str()
                .into(),
            lapin::options::ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
}

/// Routes a claimed `function` (published to `functions_exchange`) to `queue`: binds its
/// exchange to the queue and from the functions exchange. Idempotent.
///
/// # Errors
/// The broker's error.
pub async fn route_function(
    channel: &Channel,
    functions_exchange: &str,
    function: &str,
    queue: &str,
) -> Result<(), lapin::Error> {
    let exchange = function_exchange(functions_exchange, function);
    channel
        .queue_bind(
            queue.into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_bind(
            exchange.as_str().into(),
            functions_exchange.into(),
            function.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Checks a functions exchange name: at most [`MAX_FUNCTIONS_EXCHANGE`] bytes (so that
/// `<it>.<function>` fits AMQP's 255 for every function name), not `amq.`, no control
/// characters. Empty is valid: routing by function is off.
///
/// # Errors
/// A message saying what is wrong.
pub fn validate_functions_exchange(name: &str) -> Result<(), String> {
    if name.len() > MAX_FUNCTIONS_EXCHANGE {
        return Err(format!(
            "functions exchange name is {} bytes long; the limit is {MAX_FUNCTIONS_EXCHANGE}",
            name.len()
        ));
    }
    if name.starts_with("amq.") {
        return Err(format!(
            "functions exchange {name:?} uses the reserved prefix \"amq.\""
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "functions exchange {name:?} contains control characters"
        ));
    }
    Ok(())
}

/// The longest functions exchange name, in bytes: with a `.` and a function name of
/// [`MAX_FUNCTION_NAME`], a function's exchange name stays within AMQP's 255.
pub const MAX_FUNCTIONS_EXCHANGE: usize = 255 - 1 - MAX_FUNCTION_NAME;

/// The queue that owns a function, from the broker's refusal of another queue's claim
/// (`... inequivalent arg 'alternate-exchange' for exchange 'E' in vhost '/': received 'Q2' but
/// current is 'Q1'`). AMQP cuts error texts at 255 bytes, so a long name may end in `...`.
pub fn claimed_by(error: &lapin::Error) -> Option<String> {
    claimed_by_text(&inequivalent_arg(error)?)
}

fn claimed_by_text(text: &str) -> Option<String> {
    if !text.contains("'alternate-exchange'") {
        return None;
    }
    let owner = text
        .find("current is '")
        .map_or("", |at| &text[at + "current is '".len()..]);
    let owner = owner.split_once('\'').map_or(owner, |(name, _)| name);
    Some(
        if owner.is_empty() {
            UNNAMED_OWNER
        } else {
            owner
        }
        .to_owned(),
    )
}

/// What [`claimed_by`] answers when the broker's text names no owner (cut before the name, or
/// a function exchange without `alternate-exchange`).
pub const UNNAMED_OWNER: &str = "?";

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Dead-letters to queue `target` through the default exchange, with the broker's
/// at-least-once strategy (publisher confirms inside the broker, so a message is never dropped
/// on the way; it needs the reject-publish overflow).
fn dead_letter_to(args: &mut FieldTable, target: &str) {
    let text = |v: &str| AMQPValue::LongString(v.into());
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(target));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
}

/// The arguments of work queue `names.work`.
pub fn work_queue_args(names: &QueueNames) -> FieldTable {
    let mut args = quorum_args();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    dead_letter_to(&mut args, &names.dead);
    args
}

/// Declares the exchange, the work queue, its dead-letter queue and the binding. Idempotent.
///
/// # Errors
/// The broker's error; an `inequivalent arg` error means `queue` exists with other arguments
/// (for example as a classic queue) and must be deleted before Warren can use the name.
pub async fn declare(channel: &Channel, queue: &str) -> Result<QueueNames, lapin::Error> {
    let names = QueueNames::new(queue);
    let durable = QueueDeclareOptions::durable();
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(names.dead.as_str().into(), durable, quorum_args())
        .await?;
    channel
        .queue_declare(names.work.as_str().into(), durable, work_queue_args(&names))
        .await?;
    channel
        .queue_bind(
            names.work.as_str().into(),
            EXCHANGE.into(),
            ShortString::from(names.work.as_str()),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(names)
}

/// The broker's text when `error` says a queue exists with other arguments (`406
/// PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'Q' ...`), else `None`.
pub fn inequivalent_arg(error: &lapin::Error) -> Option<String> {
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    let text = amqp.get_message().as_str();
    (amqp.get_id() == 406 && text.contains("inequivalent arg")).then(|| text.to_owned())
}

/// The queue an `inequivalent arg` text is about (`... for queue 'Q' in vhost ...`).
pub fn inequivalent_queue(text: &str) -> Option<&str> {
    let rest = &text[text.find("for queue '")? + "for queue '".len()..];
    Some(&rest[..rest.find('\'')?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_of_an_inequivalent_arg_error_is_found() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'mail.dead' \
                    in vhost '/': received the value 'quorum' of type 'longstr' but current is none";
        assert_eq!(inequivalent_queue(text), Some("mail.dead"));
        assert_eq!(inequivalent_queue("something else"), None);
    }

    #[test]
    fn names_follow_the_queue() {
        let n = QueueNames::new("mail");
        assert_eq!(n.work, "mail");
        assert_eq!(n.dead, "mail.dead");
    }

    #[test]
    fn work_queue_dead_letters_to_its_dead_queue() {
        let args = work_queue_args(&QueueNames::new("q"));
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("q.dead".into()))
        );
        assert_eq!(
            get("x-delivery-limit"),
            Some(AMQPValue::LongLongInt(DELIVERY_LIMIT))
        );
    }

    #[test]
    fn retry_queues_are_named_by_their_delay() {
        assert_eq!(
            retry_queue_name("q", Duration::from_millis(250)),
            "q.delay.250ms"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_secs(10)),
            "q.delay.10s"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_secs(120)),
            "q.delay.2m"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_millis(1500)),
            "q.delay.1500ms"
        );
    }

    #[test]
    fn delay_queues_expire_after_their_messages() {
        for delay in [Duration::from_millis(100), Duration::from_secs(86_400)] {
            let args = retry_queue_args("q", delay);
            let get = |k: &str| match args.inner().get(k) {
                Some(AMQPValue::LongLongInt(v)) => u64::try_from(*v).ok(),
                _ => None,
            };
            let ttl = get("x-message-ttl").map(Duration::from_millis);
            let expires = get("x-expires").map(Duration::from_millis);
            assert_eq!(ttl, Some(delay));
            assert!(expires.is_some_and(
                |e| e >= delay + REDECLARE_RETRY_QUEUE_EVERY + Duration::from_secs(30)
            ));
        }
    }

    #[test]
    fn the_owner_of_a_function_is_read_from_the_refusal() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange \
                    'warren.functions.echo' in vhost '/': received 'b' but current is 'a'";
        assert_eq!(claimed_by_text(text).as_deref(), Some("a"));
        let cut = "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange \
                   'e' in vhost '/': received 'b' but current is 'a-very-long-na...";
        assert_eq!(claimed_by_text(cut).as_deref(), Some("a-very-long-na..."));
        let other = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q'";
        assert_eq!(claimed_by_text(other), None);
    }

    #[test]
    fn function_names_are_checked() {
        assert!(validate_function_name("send_mail").is_ok());
        assert!(validate_function_name("").is_err());
        assert!(validate_function_name(&"f".repeat(MAX_FUNCTION_NAME + 1)).is_err());
        assert!(validate_function_name("a\tb").is_err());
        let longest = function_exchange(
            &"x".repeat(MAX_FUNCTIONS_EXCHANGE),
            &"f".repeat(MAX_FUNCTION_NAME),
        );
        assert_eq!(longest.len(), 255);
        assert!(validate_functions_exchange(&"x".repeat(MAX_FUNCTIONS_EXCHANGE)).is_ok());
        assert!(validate_functions_exchange(&"x".repeat(MAX_FUNCTIONS_EXCHANGE + 1)).is_err());
        assert!(validate_functions_exchange("amq.functions").is_err());
        assert!(validate_functions_exchange("").is_ok());
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(validate_queue_name("warren.tasks").is_ok());
        assert!(validate_queue_name("").is_err());
        assert!(validate_queue_name("amq.gen-1").is_err());
        assert!(validate_queue_name(&"x".repeat(201)).is_err());
        assert!(validate_queue_name("a\nb").is_err());
    }
}
