//! Other "hosts" on this machine: network namespaces joined to the host by veth pairs, for tests
//! of workers that reach the broker over a network link of their own that a test can cut.
//!
//! Each [`NetHost`] is a namespace made with `ip netns add`, with loopback up and one end of a
//! veth pair (`10.200.<n>.2/24`); the other end stays in the host's namespace
//! (`10.200.<n>.1/24`), where a [`BrokerNode`](crate::node::BrokerNode) can listen. Traffic goes
//! only between the host and the namespaces the test made. [`NetHost::cut`] takes the
//! namespace's end down: nothing is sent, no FIN, no RST, so each side notices only by missed
//! heartbeats, as with a pulled cable. Dropping a `NetHost` deletes the veth pair and the
//! namespace, also when the test fails. Needs root and `ip` (iproute2).

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

/// A network namespace with a veth link to the host; deleted on drop.
#[derive(Debug)]
pub struct NetHost {
    namespace: String,
    host_end: String,
    ns_end: String,
    subnet: u8,
}

/// Runs `ip ARGS` and returns its output.
fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"))
}

/// Runs `ip ARGS` and panics with its output when it fails.
fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process can make network namespaces (root with `ip`): a namespace is made and
/// deleted to find out. `Err` says why not.
pub fn available() -> Result<(), String> {
    let probe = format!("warren-probe-{}", short_id());
    match Command::new("ip")
        .args(["netns", "add", &probe])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let _ = ip(&["netns", "del", &probe]);
            Ok(())
        }
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Err(e) => Err(format!("cannot run `ip` ({e}); install iproute2")),
    }
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_owned()
}

/// `10.200.<n>` subnets already on some interface of the host.
fn subnets_in_use() -> Vec<u8> {
    let out = ip(&["-4", "-o", "addr", "show"]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("10.200."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

impl NetHost {
    /// Makes `count` namespaces, each linked to the host on a `10.200.<n>.0/24` subnet that no
    /// interface uses yet.
    ///
    /// # Panics
    ///
    /// When an `ip` command fails (not root, no iproute2); what was made so far is deleted.
    pub fn create(count: usize) -> Vec<Self> {
        let id = short_id();
        let mut taken = subnets_in_use();
        let mut hosts = Vec::with_capacity(count);
        for i in 0..count {
            let subnet = loop {
                let n = fastrand_subnet();
                if !taken.contains(&n) {
                    taken.push(n);
                    break n;
                }
            };
            // Interface names have at most 15 bytes.
            let host = Self {
                namespace: format!("warren-{id}-{i}"),
                host_end: format!("wr{id}{i}h"),
                ns_end: format!("wr{id}{i}n"),
                subnet,
            };
            ip_ok(&["netns", "add", &host.namespace]);
            // From here on, Drop deletes what exists, also when a later command fails.
            hosts.push(host);
            let host = &hosts[i];
            ip_ok(&[
                "link",
                "add",
                &host.host_end,
                "type",
                "veth",
                "peer",
                "name",
                &host.ns_end,
                "netns",
                &host.namespace,
            ]);
            let host_cidr = format!("{}/24", host.host_ip());
            let ns_cidr = format!("{}/24", host.ip());
            ip_ok(&["addr", "add", &host_cidr, "dev", &host.host_end]);
            ip_ok(&["link", "set", &host.host_end, "up"]);
            ip_ok(&["-n", &host.namespace, "link", "set", "lo", "up"]);
            ip_ok(&[
                "-n",
                &host.namespace,
                "addr",
                "add",
                &ns_cidr,
                "dev",
                &host.ns_end,
            ]);
            ip_ok(&["-n", &host.namespace, "link", "set", &host.ns_end, "up"]);
        }
        hosts
    }

    /// The namespace's name (`warren-<id>-<i>`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The namespace's own address, `10.200.<n>.2`.
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.subnet, 2)
    }

    /// The host's address on this link, `10.200.<n>.1`: where a broker listens for this host.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.subnet, 1)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which execs it, so
    /// the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(program);
        command
    }

    /// Cuts the link silently: the namespace's end goes down, so nothing more leaves or
    /// arrives, and neither side is told.
    pub fn cut(&self) {
        ip_ok(&["-n", &self.namespace, "link", "set", &self.ns_end, "down"]);
    }

    /// Restores the link after [`cut`](Self::cut).
    pub fn restore(&self) {
        ip_ok(&["-n", &self.namespace, "link", "set", &self.ns_end, "up"]);
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        // Deleting one end deletes the pair at once; deleting the namespace alone would leave
        // the host's end until the kernel gets round to it.
        let _ = ip(&["link", "del", &self.host_end]);
        let _ = ip(&["netns", "del", &self.namespace]);
    }
}

/// A random subnet number, 1-254.
fn fastrand_subnet() -> u8 {
    (uuid::Uuid::new_v4().as_bytes()[0] % 254) + 1
}
