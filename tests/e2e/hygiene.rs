//! The test helpers leave nothing behind: a test that ends (or fails) without shutting its
//! in-process worker down still gets its worker stopped before its queues are deleted, so that
//! the worker cannot declare them again afterwards.

use std::time::Duration;

use warren_tests::{TestQueue, inspect_queue, raw_channel};
use warren_worker::{RunningWorker, WorkerState};

/// Bound on the worker stopping once its queue is dropped. A worker that is not stopped by
/// then has found its queue deleted under it and declared it again within milliseconds.
const STOPPED_WITHIN: Duration = Duration::from_secs(10);

fn echo() -> warren_worker::Registry {
    warren_worker::Registry::new().register::<warren_shared::tasks::Echo>()
}

/// Whether queue `name` exists now (a passive declare on a channel of its own).
async fn exists(connection: &lapin::Connection, name: &str) -> bool {
    let channel = connection.create_channel().await.unwrap();
    inspect_queue(&channel, name).await.is_ok()
}

/// After `queue` (whose worker is `worker`) was dropped without `worker.shutdown()`: the worker
/// stops, and neither its queue nor its dead-letter queue exist any more. Cleans up what a
/// failure left behind before asserting.
async fn assert_left_nothing(worker: RunningWorker, queue: &str) {
    let mut health = worker.health_changes();
    let stopped = tokio::time::timeout(
        STOPPED_WITHIN,
        health.wait_for(|h| h.state == WorkerState::Stopped),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let (connection, _) = raw_channel().await;
    let names = [queue.to_owned(), format!("{queue}.dead")];
    let mut left = Vec::new();
    for name in &names {
        if exists(&connection, name).await {
            left.push(name.clone());
        }
    }
    // A failure's leftovers: stop the worker first, then delete what it declared again.
    let _ = worker.shutdown().await;
    for name in &names {
        let channel = connection.create_channel().await.unwrap();
        let _ = channel
            .queue_delete(name.as_str().into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "test cleanup".into()).await;
    assert!(
        left.is_empty(),
        "queues declared again after their TestQueue was dropped: {left:?}"
    );
    assert!(
        stopped,
        "the worker still runs after its TestQueue was dropped"
    );
}

/// A worker whose handle outlives its queue (a struct holding the queue before the worker
/// drops them in that order) is stopped, and waited for, before the queue is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_test_queue_stops_its_worker_before_deleting_its_queues() {
    let q = TestQueue::new("hygiene-mt");
    let name = q.name.clone();
    let w = q.worker(echo(), 2).await;
    drop(q);
    let state = w.health().state;
    assert_left_nothing(w, &name).await;
    assert_eq!(
        state,
        WorkerState::Stopped,
        "the TestQueue waits for its worker to stop before deleting its queues"
    );
}

/// On a single-threaded runtime the worker cannot run while the queue is being deleted; when
/// the test goes on, it finds itself stopped and does not declare its queue again.
#[tokio::test]
async fn a_worker_outliving_its_test_queue_does_not_declare_it_again() {
    let q = TestQueue::new("hygiene-ct");
    let name = q.name.clone();
    let w = q.worker(echo(), 2).await;
    drop(q);
    assert_left_nothing(w, &name).await;
}
