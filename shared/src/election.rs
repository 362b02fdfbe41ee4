//! One election mechanism for Warren's elected roles (cron firing, and later batch coordination
//! and limit refills): exactly one process of a virtual host leads a role at a time.
//!
//! RabbitMQ does not tell a consumer that it became the active one of a single-active-consumer
//! queue, so leadership is a message: every candidate consumes the quorum queue
//! `warren.leader.<role>` (declared with `x-single-active-consumer`, no delivery limit, no TTL;
//! manual acks) and, each time it (re)joins, publishes one *baton* to it with a confirm. The
//! broker delivers every baton to the one active consumer, so **holding a baton unacked is being
//! the leader**. The leader keeps the newest baton and acks the others (extra batons of later
//! candidates). When its channel, connection or process dies the broker requeues the baton to
//! the next consumer, which becomes leader: at once when the connection closes (a killed
//! process's socket is closed by its kernel), after the broker's heartbeat timeout when the leader's
//! host goes silent. Before RabbitMQ's `consumer_timeout` (30 min by default) would close the
//! channel under a baton held too long, the leader renews it
//! ([`ElectionSettings::renew_every`], 10 min): it publishes a new baton (confirmed) and, when
//! that one arrives, acks the old.
//!
//! Leadership ends the moment the election's channel or connection errors, the link replaces its
//! connection, or the election is resigned: the [`Leadership`] handed out by
//! [`Election::leading`] is then cancelled, and is never valid again (a new term is a new
//! `Leadership`). A leader publishes what it does on [`Leadership::connection`], the very
//! connection its baton is held on, so that a leader cut off from the broker cannot publish
//! either. The election rides on a [`Link`] (the one owner of connection recovery): on each new
//! connection it consumes again and publishes a new baton, as a candidate.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerError;
use crate::link::{Generation, Link, LinkState, POLL_INTERVAL};
use crate::pool::{self, Publication, PublishError};
use crate::{envelope, topology};

/// The prefix of every role's queue: `warren.leader.<role>`.
pub const QUEUE_PREFIX: &str = "warren.leader.";

/// The default of [`ElectionSettings::renew_every`]: well inside RabbitMQ's default
/// `consumer_timeout` of 30 minutes (which is checked about once a minute).
pub const DEFAULT_RENEW_EVERY: Duration = Duration::from_secs(10 * 60);

/// Deliveries a candidate may hold at once: its baton and a few extra ones on their way to
/// being acked.
const PREFETCH: u16 = 4;

/// The AMQP `type` of a baton message.
pub const BATON_TYPE: &str = "warren.baton";

/// The first and the largest pause before consuming again after a session failed on a
/// connection that is still up (a channel error).
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How an election runs.
#[derive(Debug, Clone)]
pub struct ElectionSettings {
    /// How often the leader replaces its baton by a new one. Keep it well below the broker's
    /// `consumer_timeout` (30 min by default): a baton held unacked longer gets the election's
    /// channel closed, which ends the leadership (another candidate then leads).
    pub renew_every: Duration,
    /// Bound on publishing one baton, confirm included.
    pub publish_timeout: Duration,
    /// Who this candidate is, in its consumer tag and batons (the management UI shows the
    /// active consumer): usually the process name ([`crate::broker::process_name`]).
    pub name: String,
}

impl Default for ElectionSettings {
    fn default() -> Self {
        Self {
            renew_every: DEFAULT_RENEW_EVERY,
            publish_timeout: Duration::from_secs(10),
            name: crate::broker::process_name("warren"),
        }
    }
}

/// Where a candidate stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElectionState {
    /// Consuming the role's queue without a baton: another candidate leads (or a baton is on
    /// its way).
    Candidate,
    /// Holding a baton: this process leads. `term` counts this process's terms, from 1.
    Leader {
        /// This process's term number.
        term: u64,
        /// Batons received this term: the first, then one per renewal or extra baton (each
        /// replaces the one held, which is acked).
        batons: u64,
    },
    /// Not in the election for now: its connection is lost or its channel failed; it joins
    /// again on the link's next connection (or after a pause).
    Out {
        /// Why.
        reason: String,
    },
    /// Out for good: resigned, or its link closed.
    Stopped,
}

/// One term of leadership; cancelled, for good, when it is lost.
#[derive(Debug, Clone)]
pub struct Leadership {
    term: u64,
    lost: CancellationToken,
    connection: Arc<Connection>,
}

impl Leadership {
    /// This process's term number (1 for its first term).
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Whether the leadership still holds. Check it before each act: once `false` it never
    /// becomes `true` again.
    pub fn is_held(&self) -> bool {
        !self.lost.is_cancelled()
    }

    /// Resolves when the leadership is lost (at once if it already is).
    pub async fn lost(&self) {
        self.lost.cancelled().await;
    }

    /// A token cancelled when the leadership is lost (cancelling it does not resign).
    pub fn token(&self) -> CancellationToken {
        self.lost.child_token()
    }

    /// The connection the baton is held on: publish the leader's work on it, so that a leader
    /// that lost its connection cannot publish either.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }
}

/// Why an election could not be joined or went on without this process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElectionError {
    /// The role makes no valid queue name.
    #[error("invalid role {role:?}: {reason}")]
    InvalidRole {
        /// The role.
        role: String,
        /// What is wrong.
        reason: String,
    },
    /// The broker refused or failed an operation (a 403 names the permission: `configure` to
    /// declare `warren.leader.<role>`, `write` to publish a baton, `read` to consume it).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The role's queue exists with other arguments than an election needs.
    #[error(
        "queue {queue:?} exists with other arguments than an election needs (a quorum queue \
         with x-single-active-consumer): {detail}. Delete it (`rabbitmqctl delete_queue \
         {queue}`); candidates declare it again"
    )]
    QueueMismatch {
        /// The role's queue.
        queue: String,
        /// The broker's words.
        detail: String,
    },
    /// A baton could not be published (not confirmed in time, or refused).
    #[error("cannot publish a baton to {queue:?}: {source}")]
    Baton {
        /// The role's queue.
        queue: String,
        /// Why.
        #[source]
        source: PublishError,
    },
    /// The election is over for this process: it resigned, or its link closed.
    #[error(
        "the election for role {role:?} is over for this process (resigned, or its link closed)"
    )]
    Stopped {
        /// The role.
        role: String,
    },
}

/// The queue of `role`.
pub fn queue_name(role: &str) -> String {
    format!("{QUEUE_PREFIX}{role}")
}

/// The arguments of a role's queue: quorum (replicated, survives a node), single active
/// consumer; no delivery limit (a baton is requeued at every failover) and no TTL.
pub fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args
}

/// This process's place in the election of one role; see the [module](self). Dropping it
/// resigns (the broker hands the baton on when the election's channel closes).
#[derive(Debug)]
pub struct Election {
    role: String,
    state: watch::Receiver<ElectionState>,
    leadership: watch::Receiver<Option<Leadership>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for Election {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the election task shares with its [`Election`].
struct Shared {
    role: String,
    queue: String,
    settings: ElectionSettings,
    state: watch::Sender<ElectionState>,
    leadership: watch::Sender<Option<Leadership>>,
    stop: CancellationToken,
}

impl Election {
    /// Joins the election of `role` on `link`: declares `warren.leader.<role>`, consumes it and
    /// publishes a baton, on the link's current connection, then follows the link's
    /// connections. Returns as a candidate; [`Election::leading`] waits for the leadership.
    /// The election does not keep the link open.
    ///
    /// # Errors
    /// [`ElectionError::InvalidRole`], [`ElectionError::QueueMismatch`],
    /// [`ElectionError::Broker`] (a 403 names the permission), [`ElectionError::Baton`].
    pub async fn join(
        link: &Link,
        role: &str,
        settings: ElectionSettings,
    ) -> Result<Self, ElectionError> {
        let queue = queue_name(role);
        topology::validate_queue_name(&queue).map_err(|reason| ElectionError::InvalidRole {
            role: role.to_owned(),
            reason,
        })?;
        let generations = link.generations();
        let states = link.subscribe();
        let generation = generations.borrow().clone();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            role: role.to_owned(),
            queue,
            settings,
            state: watch::Sender::new(ElectionState::Candidate),
            leadership: watch::Sender::new(None),
            stop: stop.clone(),
        });
        let session = Session::open(&shared, &generation).await?;
        let state = shared.state.subscribe();
        let leadership = shared.leadership.subscribe();
        let task = tokio::spawn(run(shared, generations, states, session, generation));
        Ok(Self {
            role: role.to_owned(),
            state,
            leadership,
            stop,
            task: Some(task),
        })
    }

    /// The role.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Where this process stands now.
    pub fn state(&self) -> ElectionState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every change of [`Election::state`].
    pub fn watch(&self) -> watch::Receiver<ElectionState> {
        self.state.clone()
    }

    /// Whether this process leads now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.state.borrow(), ElectionState::Leader { .. })
    }

    /// Waits until this process leads, and gives that term's [`Leadership`] (at once when it
    /// already leads).
    ///
    /// # Errors
    /// [`ElectionError::Stopped`] when the election is over for this process.
    pub async fn leading(&mut self) -> Result<Leadership, ElectionError> {
        let stopped = || ElectionError::Stopped {
            role: self.role.clone(),
        };
        loop {
            if *self.state.borrow() == ElectionState::Stopped {
                return Err(stopped());
            }
            if let Some(leadership) = self.leadership.borrow_and_update().clone()
                && leadership.is_held()
            {
                return Ok(leadership);
            }
            tokio::select! {
                changed = self.leadership.changed() => if changed.is_err() { return Err(stopped()) },
                changed = self.state.changed() => if changed.is_err() { return Err(stopped()) },
            }
        }
    }

    /// Leaves the election: cancels the consumer and closes its channel, so that the broker
    /// hands a held baton to the next candidate. Returns once that is done.
    pub async fn resign(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The election's life: one session per connection of the link.
async fn run(
    shared: Arc<Shared>,
    mut generations: watch::Receiver<Generation>,
    mut states: watch::Receiver<LinkState>,
    first: Session,
    generation: Generation,
) {
    let mut session = Some(first);
    let mut number = generation.number;
    let mut term = 0;
    let mut retry = RETRY_MIN;
    loop {
        if let Some(open) = session.take() {
            retry = RETRY_MIN;
            let reason = open
                .hold(&shared, &mut generations, &mut states, number, &mut term)
                .await;
            match reason {
                None => break,
                Some(reason) => {
                    tracing::warn!(role = %shared.role, %reason, "out of the election; joining again");
                    shared.state.send_replace(ElectionState::Out { reason });
                }
            }
        }
        // Join again on the next connection, or on this one after a pause (a channel error).
        let next = tokio::select! {
            () = shared.stop.cancelled() => break,
            changed = generations.changed() => match changed {
                Ok(()) => generations.borrow_and_update().clone(),
                Err(_) => break,
            },
            () = tokio::time::sleep(retry) => generations.borrow().clone(),
        };
        if *states.borrow() == LinkState::Closed {
            break;
        }
        if !next.connection.status().connected() {
            continue;
        }
        number = next.number;
        match Session::open(&shared, &next).await {
            Ok(open) => session = Some(open),
            Err(e) => {
                tracing::warn!(role = %shared.role, error = %e, "cannot join the election yet");
                shared.state.send_replace(ElectionState::Out {
                    reason: e.to_string(),
                });
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
    if let Some(leadership) = shared.leadership.send_replace(None) {
        leadership.lost.cancel();
    }
    shared.state.send_replace(ElectionState::Stopped);
}

/// Consuming the role's queue on one channel of one connection.
struct Session {
    channel: Channel,
    consumer: lapin::Consumer,
    connection: Arc<Connection>,
    tag: String,
}

impl Session {
    /// Declares the queue, consumes it and publishes a baton.
    async fn open(shared: &Shared, generation: &Generation) -> Result<Self, ElectionError> {
        let queue = shared.queue.as_str();
        let connection = generation.connection.clone();
        let channel = connection
            .create_channel()
            .await
            .map_err(BrokerError::from)?;
        let declared = channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), queue_args())
            .await;
        if let Err(e) = declared {
            if let Some(detail) = topology::inequivalent_arg(&e) {
                return Err(ElectionError::QueueMismatch {
                    queue: queue.to_owned(),
                    detail,
                });
            }
            return Err(BrokerError::from(e).needing("configure").into());
        }
        channel
            .basic_qos(PREFETCH, BasicQosOptions { global: false })
            .await
            .map_err(BrokerError::from)?;
        let tag = format!("{}/{}/{}", shared.settings.name, queue, generation.number);
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::from(e).needing("read"))?;
        let session = Self {
            channel,
            consumer,
            connection,
            tag,
        };
        if let Err(e) = publish_baton(shared, &session.connection).await {
            session.close().await;
            return Err(e);
        }
        Ok(session)
    }

    /// Takes deliveries until the session ends: `None` when the election stopped, else why
    /// it was lost.
    async fn hold(
        mut self,
        shared: &Shared,
        generations: &mut watch::Receiver<Generation>,
        states: &mut watch::Receiver<LinkState>,
        number: u64,
        term: &mut u64,
    ) -> Option<String> {
        let mut held: Option<lapin::Acker> = None;
        let mut batons = 0;
        let mut renew_at: Option<Instant> = None;
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        shared.state.send_replace(ElectionState::Candidate);
        let ended = loop {
            let renew = async {
                match renew_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shared.stop.cancelled() => break None,
                delivery = self.consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let previous = held.replace(delivery.acker);
                        renew_at = Some(Instant::now() + shared.settings.renew_every);
                        batons += 1;
                        match previous {
                            // The newest baton is kept; the one it replaces is acked.
                            Some(old) => {
                                match old.ack(BasicAckOptions::default()).await {
                                    Ok(true) => {}
                                    Ok(false) => break Some("cannot ack a baton: its channel is gone".into()),
                                    Err(e) => break Some(format!("cannot ack a baton: {e}")),
                                }
                                shared.state.send_replace(ElectionState::Leader { term: *term, batons });
                            }
                            None => {
                                *term += 1;
                                let leadership = Leadership {
                                    term: *term,
                                    lost: CancellationToken::new(),
                                    connection: self.connection.clone(),
                                };
                                tracing::info!(role = %shared.role, term = *term, "leading");
                                shared.leadership.send_replace(Some(leadership));
                                shared.state.send_replace(ElectionState::Leader { term: *term, batons });
                            }
                        }
                    }
                    // Closing the link on purpose ends the consumer too: that is no loss.
                    _ if *states.borrow() == LinkState::Closed => break None,
                    Some(Err(e)) => break Some(format!("election channel failed: {e}")),
                    None => break Some("the election's consumer ended (its channel closed, or the broker cancelled it)".into()),
                },
                () = renew => {
                    // Renewed when the new baton arrives (it replaces the held one above).
                    renew_at = Some(Instant::now() + shared.settings.renew_every);
                    if let Err(e) = publish_baton(shared, &self.connection).await {
                        if *states.borrow() == LinkState::Closed {
                            break None;
                        }
                        break Some(format!("cannot renew the baton: {e}"));
                    }
                }
                _ = poll.tick() => {
                    if !self.channel.status().connected() {
                        break Some("election channel closed".into());
                    }
                    if generations.borrow().number != number {
                        break Some("connection replaced".into());
                    }
                    match &*states.borrow() {
                        LinkState::Down { reason } => break Some(format!("connection lost: {reason}")),
                        LinkState::Closed => break None,
                        _ => {}
                    }
                }
            }
        };
        // Leadership ends before anything else: nothing may act on it from here.
        if let Some(leadership) = shared.leadership.send_replace(None) {
            leadership.lost.cancel();
            tracing::info!(role = %shared.role, term = leadership.term, "leadership over");
        }
        shared.state.send_replace(ElectionState::Candidate);
        drop(held);
        self.close().await;
        ended
    }

    /// Cancels the consumer and closes the channel: held batons go back to the queue.
    async fn close(self) {
        if self.channel.status().connected() {
            let cancel = self
                .channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(Duration::from_secs(5), cancel).await;
            let close = self.channel.close(200, "leaving the election".into());
            let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
        }
    }
}

/// Publishes one baton (persistent, confirmed) on a channel of its own on `connection`.
async fn publish_baton(shared: &Shared, connection: &Arc<Connection>) -> Result<(), ElectionError> {
    let timeout = shared.settings.publish_timeout;
    let channels = pool::channel_pool(connection.clone(), 1, timeout, None);
    let body = serde_json::json!({
        "role": shared.role,
        "by": shared.settings.name,
        "at": envelope::epoch_millis(SystemTime::now()),
    })
    .to_string();
    let properties = BasicProperties::default()
        .with_delivery_mode(envelope::PERSISTENT)
        .with_content_type(envelope::CONTENT_TYPE.into())
        .with_app_id(envelope::APP_ID.into())
        .with_type(BATON_TYPE.into());
    let publication = Publication {
        exchange: "",
        routing_key: &shared.queue,
        body: body.as_bytes(),
        properties,
        mandatory: true,
    };
    let published = pool::publish_confirmed(&channels, publication, timeout).await;
    pool::close_isolated(channels).await;
    published.map_err(|source| match source {
        PublishError::Channel(e) => BrokerError::from(e).needing("write").into(),
        source => ElectionError::Baton {
            queue: shared.queue.clone(),
            source,
        },
    })
}
