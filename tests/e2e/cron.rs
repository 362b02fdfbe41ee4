//! Cron schedules fired by the elected worker: two workers, the leader stopped three times,
//! every tick run at most once and none missed beyond the misfire policy.

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
    // `once`: a failover may coalesce the ticks it missed into the latest; each of the three
    // failovers leaves at most one gap, and there is none otherwise.
    let gaps = ticks
        .windows(2)
        .filter(|pair| pair[1] - pair[0] > chrono::Duration::seconds(1))
        .count();
    println!("{total} ticks ran, {gaps} gaps over 3 failovers");
    assert!(gaps <= 3, "{gaps} gaps in {ticks:?}");
}
