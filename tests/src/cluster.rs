//! A RabbitMQ cluster of private nodes on this one machine, for tests of failover.
//!
//! Each member is a [`BrokerNode`] (own name, ports and data directory); they share one Erlang
//! cookie, and every node after the first joins the first the way an operator would
//! (`rabbitmqctl stop_app; join_cluster <first>; start_app`). Quorum queues declared on the
//! cluster get a member on every node. Dropping the cluster kills every node, also when the
//! test fails.
//!
//! ```no_run
//! # async fn demo() {
//! use warren_tests::cluster::Cluster;
//! let cluster = Cluster::start("failover", 3, Default::default()).await;
//! let leader = cluster.queue_leader("%2f", "warren.tasks");
//! # }
//! ```

use crate::node::{BrokerNode, NodeOptions};

/// Nodes joined into one RabbitMQ cluster; killed on drop.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<BrokerNode>,
}

impl Cluster {
    /// Boots `size` nodes for the test `label` (at once), each with `options` plus the
    /// cluster's cookie, joins them into one cluster, and checks that every node runs in it.
    ///
    /// # Panics
    ///
    /// When a node does not boot or does not join (its output is in the message).
    pub async fn start(label: &str, size: usize, options: NodeOptions) -> Self {
        assert!(size >= 1, "a cluster needs a node");
        let cookie = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        let booting: Vec<_> = (0..size)
            .map(|i| {
                let label = format!("{label}{i}");
                let options = NodeOptions {
                    cookie: Some(cookie.clone()),
                    ..options.clone()
                };
                tokio::spawn(async move { BrokerNode::start_with(&label, options).await })
            })
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for boot in booting {
            match boot.await {
                Ok(node) => nodes.push(node),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        let cluster = Self { nodes };
        let first = cluster.nodes[0].name().to_owned();
        for node in &cluster.nodes[1..] {
            node.stop_app();
            node.ctl_ok(&["join_cluster", &first]);
            node.start_app();
        }
        let status = cluster.nodes[0].ctl_ok(&["cluster_status", "--formatter", "json"]);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        let running = status["running_nodes"].as_array().map_or(0, Vec::len);
        assert_eq!(
            running, size,
            "not every node runs in the cluster: {status}"
        );
        cluster
    }

    /// The members, in start order (the first is the one the others joined).
    pub fn nodes(&self) -> &[BrokerNode] {
        &self.nodes
    }

    /// The member at `index`, mutably (to kill and restart it).
    pub fn node_mut(&mut self, index: usize) -> &mut BrokerNode {
        &mut self.nodes[index]
    }

    /// The index of the member named `name` (an Erlang node name, `warren-...@localhost`).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name() == name)
    }

    /// Every member's URL as `user` on `vhost` (as it goes in a URL), comma-separated: what
    /// a Warren process is given as `AMQP_URL`.
    pub fn urls_as(&self, user: &str, password: &str, vhost: &str) -> String {
        self.nodes
            .iter()
            .map(|n| n.url_as(user, password, vhost))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `rabbitmqctl ARGS` on the first member where it succeeds (a stopped or killed
    /// member fails at once) and returns its output: for questions about the whole cluster.
    ///
    /// # Panics
    ///
    /// When it fails on every member.
    pub fn ctl_any(&self, args: &[&str]) -> String {
        let mut failures = String::new();
        for node in &self.nodes {
            let out = node.ctl(args);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            failures.push_str(&format!(
                "{}: {}{}\n",
                node.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        panic!("rabbitmqctl {args:?} failed on every member:\n{failures}");
    }

    /// The node name of the leader of quorum queue `queue` on `vhost` (as it goes in a URL).
    ///
    /// # Panics
    ///
    /// When the queue does not exist or has no leader.
    pub fn queue_leader(&self, vhost: &str, queue: &str) -> String {
        self.queue_item(vhost, queue, "leader")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The node names of the members of quorum queue `queue` that are `"members"` or
    /// `"online"`, sorted.
    pub fn queue_members(&self, vhost: &str, queue: &str, which: &str) -> Vec<String> {
        let mut members: Vec<String> = self
            .queue_item(vhost, queue, which)
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        members.sort();
        members
    }

    /// The node names of every member, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.nodes.iter().map(|n| n.name().to_owned()).collect();
        names.sort();
        names
    }

    /// One `rabbitmqctl list_queues` info item (`leader`, `members`, `online`, `policy`, ...)
    /// of `queue` on `vhost` (as it goes in a URL), as JSON.
    ///
    /// # Panics
    ///
    /// When no member answers or the queue is not listed.
    pub fn queue_item(&self, vhost: &str, queue: &str, item: &str) -> serde_json::Value {
        let vhost = vhost.replace("%2f", "/").replace("%2F", "/");
        let out = self.ctl_any(&[
            "list_queues",
            "-p",
            &vhost,
            "name",
            item,
            "--formatter",
            "json",
        ]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        rows.into_iter()
            .find(|row| row["name"] == queue)
            .map(|row| row[item].clone())
            .unwrap_or_else(|| panic!("queue {queue} not listed: {out}"))
    }
}
