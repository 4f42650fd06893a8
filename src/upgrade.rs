//! Zero-downtime binary upgrade, the Pingora way, with the store handed over.
//!
//! `tollgate serve --upgrade` started while another tollgate serves the same
//! store takes over from it:
//! 1. the new process listens on the upgrade socket (beside the store) and
//!    sends SIGQUIT to the old one (its pid is in a file beside the store);
//! 2. the old process passes its listening sockets over that socket, keeps
//!    serving for Pingora's 5 s hand-over, then stops accepting, lets its
//!    in-flight requests finish, flushes every charge and exits, which
//!    releases the store's lock;
//! 3. the new process, holding the same listening sockets all along, opens
//!    the store once the lock is free and starts serving. Connections that
//!    arrive meanwhile wait in the sockets' backlog: none is refused.
//!
//! Without a running process, `--upgrade` just starts normally.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long the new process waits for the old one's socket to appear.
const FIND_WAIT: Duration = Duration::from_secs(30);

/// The files that coordinate an upgrade, beside the store directory.
#[derive(Debug, Clone)]
pub struct Handover {
    pub sock: PathBuf,
    pub pid: PathBuf,
}

impl Handover {
    pub fn beside(store: &Path) -> Handover {
        let with = |ext: &str| PathBuf::from(format!("{}.{ext}", store.display()));
        Handover {
            sock: with("upgrade.sock"),
            pid: with("pid"),
        }
    }

    /// Records this process as the one serving the store.
    pub fn claim(&self) {
        if let Err(e) = std::fs::write(&self.pid, std::process::id().to_string()) {
            tracing::warn!(error = %e, path = %self.pid.display(), "cannot write the pid file; a later --upgrade will not find this process");
        }
    }

    /// Removes the pid file if it is still this process's (at exit).
    pub fn release(&self) {
        let mine = std::fs::read_to_string(&self.pid)
            .ok()
            .is_some_and(|p| p.trim() == std::process::id().to_string());
        if mine {
            let _ = std::fs::remove_file(&self.pid);
        }
    }

    /// A Unix socket path must fit in `sun_path` (108 bytes on Linux);
    /// Pingora would panic on a longer one.
    pub fn check(&self) -> anyhow::Result<()> {
        let len = self.sock.as_os_str().len();
        if len >= 100 {
            anyhow::bail!(
                "the upgrade socket path {} is {len} bytes; Unix sockets allow under 108: use a shorter store.path",
                self.sock.display()
            );
        }
        Ok(())
    }

    /// Clears a socket file left by an earlier upgrade, then, on a thread,
    /// waits for the new one to appear (Pingora's bootstrap creates it and
    /// waits for the old process) and sends SIGQUIT to the old process.
    pub fn signal_old_process(&self) -> anyhow::Result<()> {
        let pid: i32 = std::fs::read_to_string(&self.pid)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", self.pid.display()))?
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{} does not hold a pid", self.pid.display()))?;
        let _ = std::fs::remove_file(&self.sock);
        let sock = self.sock.clone();
        std::thread::Builder::new()
            .name("tollgate-upgrade".into())
            .spawn(move || {
                let deadline = Instant::now() + FIND_WAIT;
                while !sock.exists() {
                    if Instant::now() > deadline {
                        tracing::error!(sock = %sock.display(), "the upgrade socket never appeared; the old process was not signalled");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                match kill(Pid::from_raw(pid), Signal::SIGQUIT) {
                    Ok(()) => tracing::info!(pid, "asked the running tollgate to hand over (SIGQUIT)"),
                    Err(e) => tracing::error!(pid, error = %e, "cannot signal the running tollgate"),
                }
            })?;
        Ok(())
    }
}
