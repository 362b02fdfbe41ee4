//! The election of a role's leader (shared/src/election.rs) against the real broker: one leader
//! among candidates on separate connections, failover when the leader's connection goes,
//! renewal, late joiners and extra batons.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use warren_shared::BrokerSettings;
use warren_shared::broker::Purpose;
use warren_shared::election::{self, Election, ElectionSettings, ElectionState};
use warren_shared::link::Link;
use warren_tests::{amqp_url, delete_now, eventually, init_tracing, inspect_queue, raw_channel};

/// A role of its own for one test; its queue is deleted when dropped.
struct Role(String);

impl Role {
    fn new(label: &str) -> Self {
        init_tracing();
        Self(format!("test-{label}-{}", uuid::Uuid::new_v4().simple()))
    }

    fn queue(&self) -> String {
        election::queue_name(&self.0)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        delete_now(vec![self.queue()], Vec::new());
    }
}

/// A candidate: its own link (connection) and its place in the election.
struct Candidate {
    link: Link,
    election: Election,
}

async fn candidate(role: &Role, name: &str, renew_every: Duration) -> Candidate {
    let settings = BrokerSettings::new(amqp_url());
    let link = Link::open(&settings, name, Purpose::Consume, &[])
        .await
        .unwrap();
    let election = Election::join(
        &link,
        &role.0,
        ElectionSettings {
            renew_every,
            publish_timeout: Duration::from_secs(5),
            name: name.to_owned(),
        },
    )
    .await
    .unwrap();
    Candidate { link, election }
}

async fn candidates(role: &Role, n: usize) -> Vec<Candidate> {
    let mut all = Vec::new();
    for i in 0..n {
        all.push(
            candidate(
                role,
                &format!("candidate-{i}"),
                election::DEFAULT_RENEW_EVERY,
            )
            .await,
        );
    }
    all
}

fn leaders(all: &[Candidate]) -> Vec<usize> {
    (0..all.len())
        .filter(|&i| all[i].election.is_leader())
        .collect()
}

/// Waits until exactly one candidate leads and every baton has been delivered (none ready),
/// and gives its index.
async fn one_leader(role: &Role, all: &[Candidate], within: Duration) -> usize {
    let (_connection, channel) = raw_channel().await;
    let queue = role.queue();
    eventually("exactly one leader, no baton left ready", within, || {
        let channel = channel.clone();
        let queue = queue.clone();
        let one = leaders(all).len() == 1;
        async move {
            one && inspect_queue(&channel, &queue)
                .await
                .is_ok_and(|q| q.message_count() == 0)
        }
    })
    .await;
    leaders(all)[0]
}

#[tokio::test]
async fn exactly_one_of_three_candidates_leads_and_a_late_joiner_does_not_take_over() {
    let role = Role::new("one-leader");
    let mut all = candidates(&role, 3).await;
    let leader = one_leader(&role, &all, Duration::from_secs(10)).await;
    let leadership = all[leader].election.leading().await.unwrap();
    assert_eq!(leadership.term(), 1);
    assert!(leadership.is_held());
    for (i, c) in all.iter().enumerate() {
        if i != leader {
            assert_eq!(c.election.state(), ElectionState::Candidate);
        }
    }
    // A fourth candidate joins later: its baton goes to the leader, which acks it.
    all.push(candidate(&role, "late", election::DEFAULT_RENEW_EVERY).await);
    assert_eq!(
        one_leader(&role, &all, Duration::from_secs(10)).await,
        leader
    );
    assert!(leadership.is_held());
    assert_eq!(all[3].election.state(), ElectionState::Candidate);
    for c in &all {
        c.link.close().await;
    }
}

#[tokio::test]
async fn extra_batons_do_not_make_a_second_leader() {
    let role = Role::new("extra-batons");
    let all = candidates(&role, 2).await;
    let leader = one_leader(&role, &all, Duration::from_secs(10)).await;
    // Someone (an operator, a bug) publishes more batons: all reach the leader.
    let (_connection, channel) = raw_channel().await;
    for _ in 0..10 {
        channel
            .basic_publish(
                "".into(),
                role.queue().as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    eventually(
        "the leader took every extra baton",
        Duration::from_secs(10),
        || {
            let batons = match all[leader].election.state() {
                ElectionState::Leader { batons, .. } => batons,
                _ => 0,
            };
            async move { batons >= 11 }
        },
    )
    .await;
    assert_eq!(
        one_leader(&role, &all, Duration::from_secs(10)).await,
        leader
    );
    assert!(matches!(
        all[leader].election.state(),
        ElectionState::Leader { term: 1, .. }
    ));
    for c in &all {
        c.link.close().await;
    }
}

#[tokio::test]
async fn when_the_leaders_connection_closes_another_leads_within_ten_seconds() {
    let role = Role::new("failover");
    let mut all = candidates(&role, 3).await;
    let first = one_leader(&role, &all, Duration::from_secs(10)).await;
    let lost = all[first].election.leading().await.unwrap();
    let closed = Instant::now();
    all[first].link.close().await;
    tokio::time::timeout(Duration::from_secs(1), lost.lost())
        .await
        .expect("leadership is lost with its connection");
    let rest: Vec<Candidate> = all
        .drain(..)
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, c)| c)
        .collect();
    let second = one_leader(&role, &rest, Duration::from_secs(10)).await;
    let failover = closed.elapsed();
    println!("failover after the leader's connection closed: {failover:?}");
    assert!(failover < Duration::from_secs(10), "{failover:?}");
    assert!(matches!(
        rest[second].election.state(),
        ElectionState::Leader { term: 1, .. }
    ));
    for c in &rest {
        c.link.close().await;
    }
}

#[tokio::test]
async fn a_leader_whose_connection_is_lost_hands_over_and_rejoins_as_a_candidate() {
    let role = Role::new("reconnect");
    let mut all = candidates(&role, 2).await;
    let first = one_leader(&role, &all, Duration::from_secs(10)).await;
    let lost = all[first].election.leading().await.unwrap();
    let generation = all[first].link.generation();
    let reset = Instant::now();
    // As if the connection were lost: the link replaces it.
    all[first].link.reset();
    tokio::time::timeout(Duration::from_secs(5), lost.lost())
        .await
        .expect("the old leadership is cancelled");
    let other = 1 - first;
    let mut next = all[other].election.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        next.wait_for(|s| matches!(s, ElectionState::Leader { .. })),
    )
    .await
    .expect("the other candidate leads within 10 s")
    .unwrap();
    println!(
        "failover after the leader's connection was lost: {:?}",
        reset.elapsed()
    );
    // The old leader is back on a new connection, as a candidate: it does not take over.
    eventually(
        "the old leader reconnected",
        Duration::from_secs(10),
        || {
            let link = all[first].link.clone();
            async move { link.generation() > generation && link.state().is_up() }
        },
    )
    .await;
    assert_eq!(
        one_leader(&role, &all, Duration::from_secs(10)).await,
        other
    );
    let mut old = all[first].election.watch();
    old.wait_for(|s| *s == ElectionState::Candidate)
        .await
        .unwrap();
    assert!(!lost.is_held());
    for c in &all {
        c.link.close().await;
    }
}

#[tokio::test]
async fn a_leader_renews_its_baton_and_stays_leader() {
    let role = Role::new("renew");
    let mut all = Vec::new();
    for i in 0..2 {
        all.push(candidate(&role, &format!("renewing-{i}"), Duration::from_millis(200)).await);
    }
    let leader = one_leader(&role, &all, Duration::from_secs(10)).await;
    let leadership = all[leader].election.leading().await.unwrap();
    let mut state = all[leader].election.watch();
    // Its own baton, perhaps the other's, then one per renewal.
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| matches!(s, ElectionState::Leader { batons, .. } if *batons >= 8)),
    )
    .await
    .expect("renewed batons arrive")
    .unwrap();
    assert!(leadership.is_held());
    assert!(matches!(
        all[leader].election.state(),
        ElectionState::Leader { term: 1, .. }
    ));
    assert_eq!(
        one_leader(&role, &all, Duration::from_secs(10)).await,
        leader
    );
    for c in &all {
        c.link.close().await;
    }
}

#[tokio::test]
async fn a_resigning_leader_hands_the_baton_to_the_next() {
    let role = Role::new("resign");
    let mut all = candidates(&role, 2).await;
    let first = one_leader(&role, &all, Duration::from_secs(10)).await;
    let lost = all[first].election.leading().await.unwrap();
    let Candidate { link, election } = all.remove(first);
    election.resign().await;
    assert!(!lost.is_held());
    let next = all[0].election.leading();
    let leadership = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("the other candidate leads")
        .unwrap();
    assert!(leadership.is_held());
    link.close().await;
    all[0].link.close().await;
}

#[tokio::test]
async fn a_queue_of_the_role_with_other_arguments_is_refused_by_name() {
    let role = Role::new("mismatch");
    let (_connection, channel) = raw_channel().await;
    channel
        .queue_declare(
            role.queue().as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let link = Link::open(
        &BrokerSettings::new(amqp_url()),
        "mismatch",
        Purpose::Consume,
        &[],
    )
    .await
    .unwrap();
    let error = Election::join(&link, &role.0, ElectionSettings::default())
        .await
        .unwrap_err();
    assert!(
        matches!(error, election::ElectionError::QueueMismatch { .. }),
        "{error}"
    );
    link.close().await;
}

/// A leader whose host goes silent (no FIN: its connection half-open) is replaced once the
/// broker's heartbeat check gives up on it; the silent leader's own link notices too and ends
/// its leadership. Returns (failover, old leadership lost) after the stall.
async fn silent_leader_failover(heartbeat_secs: u16) -> (Duration, Duration) {
    let role = Role::new(&format!("silent-{heartbeat_secs}"));
    let relay = warren_tests::relay::Relay::start(warren_tests::broker_addr()).await;
    let settings = BrokerSettings::new(relay.url(heartbeat_secs));
    let link = Link::open(&settings, "silent", Purpose::Consume, &[])
        .await
        .unwrap();
    let mut silent = Election::join(&link, &role.0, ElectionSettings::default())
        .await
        .unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(10), silent.leading())
        .await
        .unwrap()
        .unwrap();
    let mut other = candidate(&role, "other", election::DEFAULT_RENEW_EVERY).await;
    let stalled = Instant::now();
    relay.stall();
    let (failover, gone) = tokio::join!(
        async {
            tokio::time::timeout(Duration::from_secs(90), other.election.leading())
                .await
                .expect("the other candidate leads")
                .unwrap();
            stalled.elapsed()
        },
        async {
            tokio::time::timeout(Duration::from_secs(90), lost.lost())
                .await
                .expect("the silent leader's leadership ends");
            stalled.elapsed()
        }
    );
    println!(
        "heartbeat {heartbeat_secs}s: the other leads after {failover:?}; the silent one stopped leading after {gone:?}"
    );
    link.close().await;
    other.link.close().await;
    (failover, gone)
}

#[tokio::test]
async fn a_silent_leader_is_replaced_within_ten_seconds_with_a_three_second_heartbeat() {
    let (failover, gone) = silent_leader_failover(3).await;
    assert!(failover < Duration::from_secs(10), "{failover:?}");
    assert!(gone < Duration::from_secs(10), "{gone:?}");
}

#[tokio::test]
#[ignore = "measures the default heartbeat's failover (about a minute)"]
async fn a_silent_leader_is_replaced_with_the_default_heartbeat() {
    silent_leader_failover(15).await;
}
