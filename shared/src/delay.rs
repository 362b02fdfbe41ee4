//! Run at a time: the fixed ladder of delay levels that holds a task until it is due.
//!
//! A task that must run later is never held unacked by a worker and never gets a queue of its
//! own delay. It goes through [`LEVELS`] levels, the same broker objects whatever the number
//! of distinct delays (the binary scheme of NServiceBus and Celery 5.5):
//!
//! | name | what |
//! |---|---|
//! | exchange `warren.run-at.<L>`, L = 27..0 | durable topic exchange of level L; alternate exchange [`PARKED`] |
//! | queue `warren.run-at.<L>` | durable quorum queue, message TTL 2^L s, dead-letters (at least once) to exchange L−1, or to [`DELIVERY`] for L = 0 |
//! | exchange [`DELIVERY`] | durable topic exchange; each work queue and each claimed function is bound to it by its own name; alternate exchange [`PARKED`] |
//! | exchange and queue [`PARKED`] | fanout exchange and durable quorum queue: tasks no binding could route |
//!
//! The routing key is the delay in whole seconds written in binary, most significant bit first,
//! one word per bit, then the destination: `0.0. … .1.0.1.q.mail` waits 5 s and goes to queue
//! `mail`; `… .f.warren.functions.send_mail` goes to whichever queue claimed function
//! `send_mail` in functions exchange `warren.functions` (through the function's own exchange,
//! so that deployments with functions exchanges of their own stay apart). Exchange L
//! routes a key whose bit L is 1 into queue L, where it waits 2^L s and dead-letters, keeping
//! its key, to exchange L−1; a key whose bit L is 0 passes straight on to exchange L−1. Every
//! level waits at most once, so the total wait is the delay itself; every message in a level
//! queue has the same TTL, so none waits behind another.
//!
//! Nothing is dropped on the way: a key that no binding matches (a destination that nothing
//! is bound for, a level whose binding was deleted) goes to the alternate exchange and is
//! parked in [`PARKED`] with its routing key, which names the destination and the delay it was
//! sent with (not the time it had left), and its `x-death` history; the level queues dead-letter with the broker's
//! at-least-once strategy (`reject-publish` overflow), so a task leaves a level only once the
//! next one holds it. Everything is durable and quorum, so it survives a broker restart and the
//! loss of a node.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::future::try_join_all;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Number of delay levels: level L waits 2^L s.
pub const LEVELS: u32 = 28;

/// The longest delay: 2^28 − 1 s (8.5 years).
pub const MAX_DELAY: Duration = Duration::from_secs((1 << LEVELS) - 1);

/// The prefix of the level exchanges and queues (`warren.run-at.<L>`) and the exchange that
/// hands due tasks to their destinations.
pub const DELIVERY: &str = "warren.run-at";

/// The exchange and queue where a delayed task that nothing could route is parked.
pub const PARKED: &str = "warren.run-at.parked";

/// The longest queue (or function exchange) name a delayed task can go to: its routing key (two
/// bytes per level, the `q.` or `f.` prefix, the name) must fit AMQP's 255 bytes. With the
/// default functions exchange, every function name fits.
pub const MAX_DELAYED_QUEUE_NAME: usize = 255 - 2 * LEVELS as usize - 2;

/// Where a delayed task goes once it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// A work queue, by name.
    Queue(&'a str),
    /// Whichever queue claimed a function: the function's exchange
    /// ([`crate::topology::function_exchange`]), `<functions exchange>.<function>`.
    Function(&'a str),
}

impl Destination<'_> {
    /// The routing-key suffix that names this destination: `q.<queue>` or
    /// `f.<function exchange>`.
    pub fn suffix(&self) -> String {
        match self {
            Self::Queue(queue) => format!("q.{queue}"),
            Self::Function(exchange) => format!("f.{exchange}"),
        }
    }

    /// Checks that the destination can be written in a routing key and bound by name: no word
    /// of it (between dots) is a topic wildcard (`*`, `#`), and the key fits 255 bytes.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let (what, name) = match self {
            Self::Queue(queue) => ("queue", *queue),
            Self::Function(exchange) => ("function exchange", *exchange),
        };
        if name.split('.').any(|word| word == "*" || word == "#") {
            return Err(format!(
                "{what} name {name:?} has a word \"*\" or \"#\": a delayed task cannot be routed to it"
            ));
        }
        if name.len() > MAX_DELAYED_QUEUE_NAME {
            return Err(format!(
                "{what} name is {} bytes long; a delayed task's limit is {MAX_DELAYED_QUEUE_NAME}",
                name.len()
            ));
        }
        Ok(())
    }
}

/// Why a delay cannot be sent through the levels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DelayError {
    /// Longer than [`MAX_DELAY`].
    #[error("a delay of {0:?} is longer than the longest, {MAX_DELAY:?} (2^28 - 1 s)")]
    TooLong(Duration),
}

/// The whole seconds a task waits in the levels for `delay`: rounded up, so that a task never
/// runs before its time.
///
/// # Errors
/// [`DelayError::TooLong`] past [`MAX_DELAY`].
pub fn delay_seconds(delay: Duration) -> Result<u32, DelayError> {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    u32::try_from(secs)
        .ok()
        .filter(|s| u64::from(*s) <= MAX_DELAY.as_secs())
        .ok_or(DelayError::TooLong(delay))
}

/// The routing key of a task that waits `seconds` (below 2^28) and then goes to `to`.
pub fn routing_key(seconds: u32, to: Destination<'_>) -> String {
    let mut key = String::with_capacity(2 * LEVELS as usize + 2 + 200);
    for level in (0..LEVELS).rev() {
        key.push(if seconds >> level & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(&to.suffix());
    key
}

/// The exchange a delayed task is published to: the top level's.
pub fn entry_exchange() -> String {
    level_name(LEVELS - 1)
}

/// The name of level `level`'s exchange and queue.
pub fn level_name(level: u32) -> String {
    format!("{DELIVERY}.{level}")
}

/// The TTL of level `level`'s queue: 2^L s.
pub fn level_ttl(level: u32) -> Duration {
    Duration::from_secs(1 << level)
}

/// The binding key that picks bit `level` = `bit` of a routing key.
pub fn level_binding(level: u32, bit: bool) -> String {
    let mut key = "*.".repeat((LEVELS - 1 - level) as usize);
    key.push_str(if bit { "1.#" } else { "0.#" });
    key
}

/// The key that binds destination `to` to [`DELIVERY`]: any delay, then its name.
pub fn delivery_binding(to: Destination<'_>) -> String {
    format!("{}{}", "*.".repeat(LEVELS as usize), to.suffix())
}

/// The next exchange after level `level`: the level below, or [`DELIVERY`].
fn below(level: u32) -> String {
    match level {
        0 => DELIVERY.to_owned(),
        l => level_name(l - 1),
    }
}

/// The arguments of level `level`'s queue.
pub fn level_queue_args(level: u32) -> FieldTable {
    let text = |v: &str| AMQPValue::LongString(v.into());
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    let ttl = i64::try_from(level_ttl(level).as_millis()).unwrap_or(i64::MAX);
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert("x-dead-letter-exchange".into(), text(&below(level)));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    args
}

fn parking() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(PARKED.into()),
    );
    args
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Declares the whole ladder: the parking exchange and queue, the delivery exchange and every
/// level's exchange, queue and bindings. Idempotent; workers run it, producers only when they
/// may declare.
///
/// Pipelined: every declaration is sent at once, then every binding (which needs both ends
/// declared), so that it costs two round trips, not one per object.
///
/// # Errors
/// The broker's error (the first; the channel is closed by then).
pub async fn declare_levels(channel: &Channel) -> Result<(), lapin::Error> {
    type Step<'a> = Pin<Box<dyn Future<Output = Result<(), lapin::Error>> + Send + 'a>>;
    let none = FieldTable::default;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let names: Vec<String> = (0..LEVELS).map(level_name).collect();
    let mut declares: Vec<Step<'_>> = vec![
        Box::pin(channel.exchange_declare(PARKED.into(), ExchangeKind::Fanout, durable(), none())),
        Box::pin(async {
            channel
                .queue_declare(PARKED.into(), QueueDeclareOptions::durable(), quorum)
                .await
                .map(drop)
        }),
        Box::pin(channel.exchange_declare(
            DELIVERY.into(),
            ExchangeKind::Topic,
            durable(),
            parking(),
        )),
    ];
    for (level, name) in (0..LEVELS).zip(&names) {
        declares.push(Box::pin(channel.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            durable(),
            parking(),
        )));
        declares.push(Box::pin(async move {
            channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions::durable(),
                    level_queue_args(level),
                )
                .await
                .map(drop)
        }));
    }
    try_join_all(declares).await?;
    let bindings: Vec<(String, String)> = (0..LEVELS)
        .map(|level| (level_binding(level, true), level_binding(level, false)))
        .collect();
    let belows: Vec<String> = (0..LEVELS).map(below).collect();
    let mut binds: Vec<Step<'_>> = vec![Box::pin(channel.queue_bind(
        PARKED.into(),
        PARKED.into(),
        "".into(),
        QueueBindOptions::default(),
        none(),
    ))];
    for ((name, (one, zero)), below) in names.iter().zip(&bindings).zip(&belows) {
        binds.push(Box::pin(channel.queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            one.as_str().into(),
            QueueBindOptions::default(),
            none(),
        )));
        binds.push(Box::pin(channel.exchange_bind(
            below.as_str().into(),
            name.as_str().into(),
            zero.as_str().into(),
            ExchangeBindOptions::default(),
            none(),
        )));
    }
    try_join_all(binds).await?;
    Ok(())
}

/// Binds work queue `queue` to [`DELIVERY`], so that tasks delayed for it reach it when due.
/// Idempotent. A name [`Destination::validate`] refuses is not bound (tasks cannot be
/// delayed for it either).
///
/// # Errors
/// The broker's error.
pub async fn bind_queue(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    let to = Destination::Queue(queue);
    if to.validate().is_err() {
        return Ok(());
    }
    channel
        .queue_bind(
            queue.into(),
            DELIVERY.into(),
            delivery_binding(to).as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Binds the exchange of a claimed function (see [`crate::topology::claim_function`]) to
/// [`DELIVERY`], so that tasks delayed for the function reach the queue that claimed it.
/// Idempotent; a name [`Destination::validate`] refuses is not bound.
///
/// # Errors
/// The broker's error.
pub async fn bind_function(channel: &Channel, function_exchange: &str) -> Result<(), lapin::Error> {
    let to = Destination::Function(function_exchange);
    if to.validate().is_err() {
        return Ok(());
    }
    channel
        .exchange_bind(
            function_exchange.into(),
            DELIVERY.into(),
            delivery_binding(to).as_str().into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a routing key through the levels as the bindings do; returns the levels it
    /// waits in and whether it reaches the delivery exchange.
    fn walk(key: &str) -> Vec<u32> {
        let words: Vec<&str> = key.split('.').collect();
        let matches = |pattern: &str| {
            let p: Vec<&str> = pattern.split('.').collect();
            let fixed = &p[..p.len() - 1];
            assert_eq!(p.last(), Some(&"#"));
            fixed.iter().zip(&words).all(|(p, w)| *p == "*" || p == w)
        };
        let mut waited = Vec::new();
        for level in (0..LEVELS).rev() {
            let one = matches(&level_binding(level, true));
            let zero = matches(&level_binding(level, false));
            assert!(
                one ^ zero,
                "exactly one binding of level {level} matches {key}"
            );
            if one {
                waited.push(level);
            }
        }
        waited
    }

    #[test]
    fn every_bit_pattern_waits_in_exactly_its_levels() {
        let to = Destination::Queue("mail.out");
        for level in 0..LEVELS {
            let seconds = 1u32 << level;
            assert_eq!(walk(&routing_key(seconds, to)), vec![level]);
            // All bits below it, and every bit but this one.
            let below = seconds - 1;
            let rest = (MAX_DELAY.as_secs() as u32) & !seconds;
            for s in [below, rest] {
                let waited = walk(&routing_key(s, to));
                let total: u64 = waited.iter().map(|l| level_ttl(*l).as_secs()).sum();
                assert_eq!(total, u64::from(s), "{s}");
            }
        }
        for s in [0, 1, 2, 3, 5, 90, 86_400, 12_345_678, (1 << LEVELS) - 1] {
            let waited = walk(&routing_key(s, to));
            let total: u64 = waited.iter().map(|l| level_ttl(*l).as_secs()).sum();
            assert_eq!(total, u64::from(s));
        }
    }

    #[test]
    fn the_key_is_the_delay_in_binary_then_the_destination() {
        let key = routing_key(5, Destination::Queue("mail"));
        assert_eq!(key, format!("{}1.0.1.q.mail", "0.".repeat(25)));
        let function = crate::topology::function_exchange(
            crate::topology::FUNCTIONS_EXCHANGE,
            &"f".repeat(crate::topology::MAX_FUNCTION_NAME),
        );
        let key = routing_key(MAX_DELAY.as_secs() as u32, Destination::Function(&function));
        assert_eq!(key, format!("{}f.{function}", "1.".repeat(28)));
        assert!(Destination::Function(&function).validate().is_ok());
        let longest = routing_key(0, Destination::Queue(&"x".repeat(MAX_DELAYED_QUEUE_NAME)));
        assert_eq!(longest.len(), 255);
        assert_eq!(entry_exchange(), "warren.run-at.27");
    }

    #[test]
    fn the_delivery_binding_matches_any_delay_to_its_destination_only() {
        let binding = delivery_binding(Destination::Queue("mail"));
        let words: Vec<&str> = binding.split('.').collect();
        assert_eq!(words.len(), LEVELS as usize + 2);
        assert!(words[..LEVELS as usize].iter().all(|w| *w == "*"));
        assert_eq!(&words[LEVELS as usize..], ["q", "mail"]);
        assert_ne!(binding, delivery_binding(Destination::Function("mail")));
    }

    #[test]
    fn delays_round_up_to_whole_seconds_and_are_bounded() {
        assert_eq!(delay_seconds(Duration::from_millis(1)), Ok(1));
        assert_eq!(delay_seconds(Duration::from_millis(1000)), Ok(1));
        assert_eq!(delay_seconds(Duration::from_millis(1001)), Ok(2));
        assert_eq!(delay_seconds(MAX_DELAY), Ok((1 << LEVELS) - 1));
        let over = MAX_DELAY + Duration::from_millis(1);
        assert_eq!(delay_seconds(over), Err(DelayError::TooLong(over)));
        assert!(delay_seconds(Duration::from_secs(u64::MAX)).is_err());
    }

    #[test]
    fn destinations_that_cannot_be_bound_are_refused() {
        assert!(Destination::Queue("mail.out").validate().is_ok());
        assert!(Destination::Queue("a.*.b").validate().is_err());
        assert!(Destination::Function("#").validate().is_err());
        assert!(Destination::Queue("a*b").validate().is_ok());
        assert!(
            Destination::Queue(&"x".repeat(MAX_DELAYED_QUEUE_NAME + 1))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn each_level_waits_its_power_of_two_and_hands_on_below() {
        let args = level_queue_args(0);
        let get = |a: &FieldTable, k: &str| a.inner().get(k).cloned();
        assert_eq!(
            get(&args, "x-message-ttl"),
            Some(AMQPValue::LongLongInt(1000))
        );
        assert_eq!(
            get(&args, "x-dead-letter-exchange"),
            Some(AMQPValue::LongString(DELIVERY.into()))
        );
        let top = level_queue_args(LEVELS - 1);
        assert_eq!(
            get(&top, "x-message-ttl"),
            Some(AMQPValue::LongLongInt(1000 << 27))
        );
        assert_eq!(
            get(&top, "x-dead-letter-exchange"),
            Some(AMQPValue::LongString("warren.run-at.26".into()))
        );
    }
}
