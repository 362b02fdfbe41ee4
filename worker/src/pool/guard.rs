//! The guard that takes a pool process's whole process group down with the worker, even when
//! the worker dies by `kill -9` (or the OOM killer).
//!
//! `PR_SET_PDEATHSIG` kills a pool process when the worker dies, but not what that process
//! started (an `ffmpeg`, a shell): the kernel clears the signal in the children of a fork. So
//! each pool process gets a guard: a small process that the worker starts, once the pool
//! process runs, in the pool process's group, running this executable again in guard mode
//! ([`serve_if_guard`]). The guard blocks every signal it can and reads a pipe, the lifeline,
//! whose write end only the worker holds. However the worker dies, the kernel closes that end,
//! the guard's read returns end-of-file, and the guard SIGKILLs its group: the pool process and
//! everything it started that stayed in the group (the guard included). While the worker lives
//! it kills the group itself (time limit, recycling, shutdown), and the guard goes with it.
//!
//! The guard is the worker's child, beside the pool process rather than above or below it: the
//! pool process stays the worker's direct child, so the worker reaps it itself (its real exit
//! status, at once, through SIGCHLD), and task code never sees the guard among its own children
//! (a `wait()` loop, `pkill -P $$`). The worker reaps the guard too. While the guard lives, the
//! group's id cannot be reused, so a group kill after the pool process was reaped reaches its
//! group and no one else.
//!
//! A binary that starts pools calls [`serve_if_guard`] first thing in `main`, before any thread
//! starts; that call also tells this module that the executable can be a guard. Without it (a
//! test binary, a program that embeds the library and does not call it), pool processes get no
//! guard, and only their own parent-death signal stands (logged once).

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The argument that starts this executable as a guard: `<exe> --warren-pool-guard <pgid>`.
const GUARD_ARG: &str = "--warren-pool-guard";
/// The guard's `argv[0]`, what `ps -f` shows.
const GUARD_NAME: &str = "warren-pool-guard";
/// The guard's thread name (`/proc/<pid>/comm`, what `ps`, `top` and `pgrep` show; at most 15
/// bytes).
const GUARD_COMM: &CStr = c"warren-guard";
/// The descriptor on which the guard finds its end of the lifeline.
const LIFELINE_FD: RawFd = 3;
/// Lifeline descriptors are moved at or above this number, out of the way of stdio and of
/// [`LIFELINE_FD`].
const HIGH_FD: RawFd = 10;

/// Set by [`serve_if_guard`]: this executable knows the guard mode.
static CAN_GUARD: AtomicBool = AtomicBool::new(false);
/// Set once the worker has said that its pool processes run without guards.
static UNGUARDED_LOGGED: AtomicBool = AtomicBool::new(false);
/// The worker's lifeline, made once, held until the process exits.
static LIFELINE: OnceLock<Option<Lifeline>> = OnceLock::new();

/// Both ends of the lifeline pipe, close-on-exec: no pool process inherits them, and a guard
/// gets the read end only through an explicit `dup2` before its `execve`.
#[derive(Debug)]
struct Lifeline {
    read: OwnedFd,
    /// Never written: the worker holds it so that its death, and only that, closes the pipe.
    _write: OwnedFd,
}

/// Runs the guard and exits when this process was started as one (see the [module](self));
/// otherwise returns at once, recording that this executable can serve as a guard for the pools
/// it starts. Call it first thing in `main`, before any thread or async runtime starts.
pub fn serve_if_guard() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(GUARD_ARG)) {
        CAN_GUARD.store(true, Ordering::Relaxed);
        return;
    }
    // Named in `ps` and `pgrep` as what it is, not `exe` (it runs through /proc/self/exe).
    let _ = nix::sys::prctl::set_name(GUARD_COMM);
    let group = args.next().and_then(|g| g.to_str()?.parse::<i32>().ok());
    std::process::exit(guard(group));
}

/// The guard mode: waits for the worker's death, then kills its own process group. Refuses to
/// act (status 2) unless it leads no group and its group is the one it was started for, so that
/// a mistaken manual run never kills a shell's job.
fn guard(group: Option<i32>) -> i32 {
    let own = nix::unistd::getpgrp();
    let Some(group) = group.filter(|g| *g == own.as_raw() && own != nix::unistd::getpid()) else {
        eprintln!("warren-pool-guard: for the worker's own use (started with the wrong group)");
        return 2;
    };
    // Only SIGKILL and SIGSTOP get through: the SIGTERM that the worker sends the group first
    // must not end the guard while the group may still outlive the worker.
    let _ = SigSet::all().thread_block();
    let mut buf = [0u8; 16];
    loop {
        // SAFETY: LIFELINE_FD is the read end the worker put there before executing the guard
        // (its `pre_exec` fails the start when it cannot); a stray descriptor number only makes
        // the read fail.
        #[allow(unsafe_code)]
        let lifeline = unsafe { std::os::fd::BorrowedFd::borrow_raw(LIFELINE_FD) };
        match nix::unistd::read(lifeline, &mut buf) {
            Ok(0) => break,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                eprintln!("warren-pool-guard: cannot read the lifeline ({e}); stopping the group");
                break;
            }
        }
    }
    // The worker is gone: so goes the group, the guard last.
    let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
    0
}

/// Starts the guard of the process group `group` (a pool process's pid, which runs already) as a
/// child of the worker, in that group. `None` when this executable cannot serve as a guard
/// ([`serve_if_guard`] was not called: logged once), when it needs none (it is PID 1), or when
/// the lifeline cannot be made (logged once).
pub(crate) fn spawn(group: i32) -> Option<std::io::Result<Child>> {
    // As PID 1 (a container's init), the worker takes its whole PID namespace down when it
    // dies: the kernel kills every process in it. Guards would be of no use.
    if nix::unistd::getpid().as_raw() == 1 {
        return None;
    }
    if !CAN_GUARD.load(Ordering::Relaxed) {
        unguarded("this program did not call warren_worker::pool::serve_if_guard() in main");
        return None;
    }
    let lifeline = LIFELINE.get_or_init(|| match make_lifeline() {
        Ok(lifeline) => Some(lifeline),
        Err(e) => {
            tracing::warn!(error = %e, "cannot make the pool guards' lifeline");
            None
        }
    });
    let Some(lifeline) = lifeline.as_ref() else {
        unguarded("the lifeline could not be made");
        return None;
    };
    let read = lifeline.read.as_raw_fd();
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0(GUARD_NAME)
        .arg(GUARD_ARG)
        .arg(group.to_string())
        .env_clear()
        // Off the protocol: the guard never reads tasks nor writes frames; its rare complaint
        // goes to the worker's stderr.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(group);
    // SAFETY: the closure runs in the forked guard before exec and calls only dup2(2), which is
    // async-signal-safe, allocating nothing (the error is a raw OS error).
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            // dup2 clears close-on-exec on the copy: the guard keeps its end, and only it.
            if libc::dup2(read, LIFELINE_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Some(command.spawn())
}

/// Logs once that pool processes run without guards, and why.
pub(crate) fn unguarded(why: &str) {
    if !UNGUARDED_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            reason = why,
            "pool processes run without a guard: what task code starts may outlive a worker \
             that is killed (docs/runners.md, \"Isolation\")"
        );
    }
}

fn make_lifeline() -> nix::Result<Lifeline> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let high = |fd: OwnedFd| -> nix::Result<OwnedFd> {
        let moved = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD))?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
        #[allow(unsafe_code)]
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(moved) })
    };
    Ok(Lifeline {
        read: high(read)?,
        _write: high(write)?,
    })
}
