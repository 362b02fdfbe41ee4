//! Cron schedules fired by the elected worker: two workers, the leader stopped (or its
//! connections cut) three times, every tick run at most once and none missed beyond the misfire
//! policy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use warren_shared::election;
use warren_tests::{TestQueue, eventually};
use warren_worker::cron::{Misfire, ScheduleConfig};
use warren_worker::{Registry, RunningWorker, TaskContext, WorkerSettings};

type Ran = Arc<Mutex<Vec<String>>>;

/// The scheduled task: it takes any arguments (`{}` from the schedule).
#[derive(serde::Serialize, serde::Deserialize)]
struct Tick(serde_json::Value);

impl warren_shared::Task for Tick {
    const NAME: &'static str = "tick";
    type Output = ();
}

fn recording(ran: &Ran) -> Registry {
    let ran = ran.clone();
    Registry::new().register_fn(move |_args: Tick, ctx: TaskContext| {
        let ran = ran.clone();
        async move {
            ran.lock().unwrap().push(ctx.id().as_str().to_owned());
            Ok(())
        }
    })
}

fn settings(q: &TestQueue, role: &str, log: &str) -> WorkerSettings {
    let schedule = ScheduleConfig {
        name: "every-second".into(),
        cron: "* * * * * *".into(),
        timezone: "UTC".into(),
        function: "tick".into(),
        args: serde_json::json!({}),
        misfire: Misfire::Once,
        queue: Some(q.name.clone()),
    };
    WorkerSettings {
        schedules: vec![schedule.check().unwrap()],
        cron_role: role.to_owned(),
        cron_log: log.to_owned(),
        ..q.worker_settings(4)
    }
}

fn count(ran: &Ran) -> usize {
    ran.lock().unwrap().len()
}

#[tokio::test]
async fn the_elected_worker_fires_each_tick_once_across_three_failovers() {
    let q = TestQueue::new("cron");
    let role = format!("test-{}", uuid::Uuid::new_v4().simple());
    let log = format!("{}.cron.log", q.name);
    q.also_delete(&election::queue_name(&role));
    q.also_delete(&log);
    let ran: Ran = Arc::default();
    // The first worker to join leads; the second waits. Stopping the older one each time
    // stops the leader, and a new worker takes the other's place as the waiting one.
    let mut workers: Vec<RunningWorker> = Vec::new();
    for _ in 0..2 {
        workers.push(
            q.worker_with(recording(&ran), settings(&q, &role, &log))
                .await,
        );
    }
    for _ in 0..3 {
        let before = count(&ran);
        eventually("four more ticks ran", Duration::from_secs(10), || {
            let n = count(&ran);
            async move { n >= before + 4 }
        })
        .await;
        let leader = workers.remove(0);
        leader.shutdown().await.unwrap();
        workers.push(
            q.worker_with(recording(&ran), settings(&q, &role, &log))
                .await,
        );
    }
    let before = count(&ran);
    eventually(
        "four more ticks ran after the last failover",
        Duration::from_secs(10),
        || {
            let n = count(&ran);
            async move { n >= before + 4 }
        },
    )
    .await;
    for worker in workers {
        worker.shutdown().await.unwrap();
    }
    assert_each_tick_ran_once(&ran, 3);
}

/// No tick ran twice, at least 16 ran, and each failover left at most one gap (`once`
/// coalesces the ticks a failover missed into the latest), none otherwise.
fn assert_each_tick_ran_once(ran: &Ran, failovers: usize) {
    let ids = ran.lock().unwrap().clone();
    let mut ticks: Vec<DateTime<Utc>> = ids
        .iter()
        .map(|id| {
            let (name, tick) = id.split_once('@').unwrap();
            assert_eq!(name, "every-second");
            DateTime::parse_from_rfc3339(tick)
                .unwrap()
                .with_timezone(&Utc)
        })
        .collect();
    ticks.sort();
    let total = ticks.len();
    ticks.dedup();
    assert_eq!(ticks.len(), total, "a tick ran twice: {ids:?}");
    assert!(total >= 16, "{total} ticks ran");
    let gaps = ticks
        .windows(2)
        .filter(|pair| pair[1] - pair[0] > chrono::Duration::seconds(1))
        .count();
    println!("{total} ticks ran, {gaps} gaps over {failovers} failovers");
    assert!(gaps <= failovers, "{gaps} gaps in {ticks:?}");
}

#[tokio::test]
async fn cutting_every_workers_connections_hands_the_schedules_on_without_running_a_tick_twice() {
    let q = TestQueue::new("cron-cut");
    let role = format!("test-{}", uuid::Uuid::new_v4().simple());
    let log = format!("{}.cron.log", q.name);
    q.also_delete(&election::queue_name(&role));
    q.also_delete(&log);
    let ran: Ran = Arc::default();
    // Each worker through a relay of its own; cutting both cuts the leader, whichever it is.
    let relays = [
        warren_tests::relay::Relay::start(warren_tests::broker_addr()).await,
        warren_tests::relay::Relay::start(warren_tests::broker_addr()).await,
    ];
    let mut workers = Vec::new();
    for relay in &relays {
        let mut settings = settings(&q, &role, &log);
        settings.broker = warren_shared::BrokerSettings::new(relay.url(15));
        workers.push(q.worker_with(recording(&ran), settings).await);
    }
    for _ in 0..3 {
        let before = count(&ran);
        eventually("four more ticks ran", Duration::from_secs(10), || {
            let n = count(&ran);
            async move { n >= before + 4 }
        })
        .await;
        // Cut half-way between two ticks, away from the milliseconds in which a tick is
        // published and logged: a cut inside them is the one documented duplicate (a
        // successor publishes the tick again, with the same id), not what this test checks.
        let now = Utc::now();
        let into_second = u64::from(now.timestamp_subsec_millis());
        tokio::time::sleep(Duration::from_millis((1500 - into_second) % 1000)).await;
        for relay in &relays {
            relay.cut();
        }
    }
    let before = count(&ran);
    eventually(
        "four more ticks ran after the last cut",
        Duration::from_secs(15),
        || {
            let n = count(&ran);
            async move { n >= before + 4 }
        },
    )
    .await;
    for worker in workers {
        worker.shutdown().await.unwrap();
    }
    assert_each_tick_ran_once(&ran, 3);
}

#[tokio::test]
async fn a_schedule_whose_task_no_queue_takes_does_not_stop_the_others() {
    let q = TestQueue::new("cron-unroutable");
    let role = format!("test-{}", uuid::Uuid::new_v4().simple());
    let log = format!("{}.cron.log", q.name);
    q.also_delete(&election::queue_name(&role));
    q.also_delete(&log);
    let ran: Ran = Arc::default();
    let mut settings = settings(&q, &role, &log);
    let lost = ScheduleConfig {
        name: "nowhere".into(),
        cron: "* * * * * *".into(),
        timezone: "UTC".into(),
        function: "tick".into(),
        args: serde_json::json!({}),
        misfire: Misfire::Skip,
        queue: Some(format!("{}.missing", q.name)),
    };
    settings.schedules.insert(0, lost.check().unwrap());
    let worker = q.worker_with(recording(&ran), settings).await;
    eventually(
        "three ticks of the routable schedule ran",
        Duration::from_secs(10),
        || {
            let n = count(&ran);
            async move { n >= 3 }
        },
    )
    .await;
    worker.shutdown().await.unwrap();
    assert!(
        ran.lock()
            .unwrap()
            .iter()
            .all(|id| id.starts_with("every-second@")),
        "{ran:?}"
    );
}
