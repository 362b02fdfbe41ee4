//! What the gateway needs from the host it runs on, read and (where a process may) raised at
//! start: open file descriptors for its connections, and a listen backlog the kernel honours.
//!
//! Every connection is a descriptor, so `--max-connections` (1024 by default) needs more than
//! the soft limit of 1024 that systemd and most shells give a process; past it `accept` fails
//! with `EMFILE` and clients wait in the backlog. The soft limit may be raised up to the hard
//! limit without privileges, so [`raise_open_files_limit`] does that; what the hard limit
//! itself must be is the operator's (`LimitNOFILE=` in a systemd unit, `ulimit -Hn`). The
//! kernel silently caps a listen backlog at `net.core.somaxconn` ([`somaxconn`]).

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors the gateway uses besides its connections: the listeners, the broker
/// connection, the metrics server, logs, and slack for connections being refused.
pub const SPARE_FILES: u64 = 64;

/// Raises this process's soft limit on open files to its hard limit; returns the soft limit
/// now in force.
///
/// # Errors
/// The limit cannot be read or set (the `errno`).
pub fn raise_open_files_limit() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// The kernel's cap on a listen backlog (`/proc/sys/net/core/somaxconn`), where it can be
/// read (Linux).
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let limit = raise_open_files_limit().expect("getrlimit/setrlimit");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!((limit, soft), (hard, hard));
    }
}
