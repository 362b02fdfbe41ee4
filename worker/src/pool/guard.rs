//! The guard that takes a pool process's whole process group down with the worker, even when
//! the worker dies by `kill -9` (or the OOM killer).
//!
//! `PR_SET_PDEATHSIG` kills a pool process when the worker dies, but not what that process
//! started (an `ffmpeg`, a shell): the kernel clears the signal in the children of a fork. So
//! each pool process gets a guard: a small process in its process group, forked just before the
//! pool process's program is executed, that runs this executable again in guard mode
//! ([`serve_if_guard`]). The guard blocks every signal it can and reads a pipe, the lifeline,
//! whose write end only the worker holds. However the worker dies, the kernel closes that end,
//! the guard's read returns end-of-file, and the guard SIGKILLs its group: the pool process and
//! everything it started that stayed in the group (the guard included). While the worker lives
//! it kills the group itself (time limit, recycling, shutdown), and the guard goes with it.
//!
//! Why a guard beside the pool process rather than a shim above it: the pool process stays the
//! worker's direct child, so the worker reaps it itself (its real exit status, at once, through
//! SIGCHLD) and signals it without a relay, and its pid stays its group's id. While the guard
//! lives, that id cannot be reused, so a group kill after the pool process was reaped reaches
//! its group and no one else.
//!
//! A binary that starts pools calls [`serve_if_guard`] first thing in `main`, before any thread
//! starts; that call also tells this module that the executable can be a guard. Without it (a
//! test binary, a program that embeds the library and does not call it), pool processes get no
//! guard, and only their own parent-death signal stands.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::unistd::Pid;

/// The argument that starts this executable as a guard: `<exe> --warren-pool-guard <pgid>`.
const GUARD_ARG: &str = "--warren-pool-guard";
/// The guard's name in `ps` (its `argv[0]`).
const GUARD_NAME: &CStr = c"warren-pool-guard";
/// The descriptor on which the guard finds its end of the lifeline.
const LIFELINE_FD: RawFd = 3;
/// Lifeline descriptors are moved at or above this number, out of the way of stdio and of
/// [`LIFELINE_FD`].
const HIGH_FD: RawFd = 10;

/// Set by [`serve_if_guard`]: this executable knows the guard mode.
static CAN_GUARD: AtomicBool = AtomicBool::new(false);
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
        // SAFETY: LIFELINE_FD is the read end the worker set up before executing the guard; a
        // stray descriptor number only makes the read fail.
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

/// What a pool process's `pre_exec` needs to fork and execute its guard, prepared before the
/// fork so that nothing is allocated after it.
#[derive(Debug)]
pub(crate) struct Plan {
    lifeline: RawFd,
    flag: CString,
}

/// The guard plan for the next pool process, or `None` when this executable cannot serve as a
/// guard ([`serve_if_guard`] was not called), when it needs none (it is PID 1), or when the
/// lifeline cannot be made.
pub(crate) fn plan() -> Option<Plan> {
    // As PID 1 (a container's init), the worker takes its whole PID namespace down when it
    // dies: the kernel kills every process in it. Guards would be of no use, and as orphans of
    // a dead pool process they would come to the worker, which reaps only its own children.
    if !CAN_GUARD.load(Ordering::Relaxed) || nix::unistd::getpid().as_raw() == 1 {
        return None;
    }
    let lifeline = LIFELINE.get_or_init(|| match make_lifeline() {
        Ok(lifeline) => Some(lifeline),
        Err(e) => {
            tracing::warn!(error = %e, "cannot make the pool guards' lifeline; pool processes run without guards");
            None
        }
    });
    let lifeline = lifeline.as_ref()?;
    Some(Plan {
        lifeline: lifeline.read.as_raw_fd(),
        flag: CString::new(GUARD_ARG).ok()?,
    })
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

impl Plan {
    /// Forks the guard of the calling process's group and executes it. Runs in a pool
    /// process's `pre_exec`, after `setpgid`: only async-signal-safe calls, no allocation.
    ///
    /// # Errors
    /// The fork fails (the system is out of processes).
    pub(crate) fn spawn_guard(&self) -> std::io::Result<()> {
        // SAFETY: getpid, fork, open, dup2, fcntl, execve and _exit are async-signal-safe; the
        // strings and the descriptor were made before the pool process was forked.
        #[allow(unsafe_code)]
        unsafe {
            let group = libc::getpid();
            let mut digits = [0u8; 16];
            let group_arg = decimal(group, &mut digits);
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => {
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                    if null >= 0 {
                        // Off the protocol pipes: the guard never reads tasks nor writes frames.
                        libc::dup2(null, 0);
                        libc::dup2(null, 1);
                    }
                    // dup2 clears close-on-exec on the copy: the guard keeps its end, and only it.
                    libc::dup2(self.lifeline, LIFELINE_FD);
                    let argv = [
                        GUARD_NAME.as_ptr(),
                        self.flag.as_ptr(),
                        group_arg.as_ptr(),
                        std::ptr::null(),
                    ];
                    let envp = [std::ptr::null()];
                    libc::execve(c"/proc/self/exe".as_ptr(), argv.as_ptr(), envp.as_ptr());
                    libc::_exit(127)
                }
                _ => Ok(()),
            }
        }
    }
}

/// `n` in decimal as a C string in `buf` (no allocation).
fn decimal(n: i32, buf: &mut [u8; 16]) -> &CStr {
    let mut n = n.unsigned_abs();
    let mut at = buf.len() - 1;
    buf[at] = 0;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    CStr::from_bytes_until_nul(&buf[at..]).unwrap_or(c"0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_writes_a_c_string_without_allocating() {
        let mut buf = [0u8; 16];
        assert_eq!(decimal(0, &mut buf), c"0");
        assert_eq!(decimal(4_194_304, &mut buf), c"4194304");
        assert_eq!(decimal(i32::MAX, &mut buf), c"2147483647");
    }
}
