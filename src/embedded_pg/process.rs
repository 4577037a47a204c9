//! Running the postmaster: one supervisor thread spawns it, relays signals
//! to it and reaps it.

use super::*;

/// Grace period after the fast-shutdown signal, before escalating.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace period after each escalation (SIGQUIT, then SIGKILL).
const ESCALATION_TIMEOUT: Duration = Duration::from_secs(5);
const SUPERVISOR_POLL: Duration = Duration::from_millis(100);

/// Makes the kernel send SIGINT (fast shutdown) to postgres when the thread
/// that spawned it exits, which includes this whole process dying.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(super) fn shut_down_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes two plain syscalls
    // (prctl, getppid) and neither allocates nor takes locks. std runs it
    // after setuid/setgid, which would otherwise clear the death signal.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGINT)?;
            // If the parent died before prctl, the signal will never come.
            if nix::unistd::getppid() != parent {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn shut_down_with_parent(_command: &mut Command) {}

pub(super) type ExitReport = io::Result<ExitStatus>;

pub(super) fn describe_exit(exit: &ExitReport) -> String {
    match exit {
        Ok(status) => status.to_string(),
        Err(error) => format!("exit status unknown: {error}"),
    }
}

/// The running postmaster, owned by a dedicated supervisor thread.
///
/// The thread spawns postgres (the parent-death signal is tied to the
/// spawning thread, so it must live as long as the child), relays signals to
/// it, and reports its exit. Only that thread reaps the child, so a signal can
/// never reach a recycled pid.
pub(super) struct Server {
    pub(super) pid: i32,
    pub(super) signals: mpsc::Sender<Signal>,
    pub(super) exit: oneshot::Receiver<ExitReport>,
}

impl Server {
    pub(super) async fn spawn(command: Command) -> io::Result<Self> {
        let (spawned_tx, spawned_rx) = oneshot::channel();
        let (signals, signals_rx) = mpsc::channel();
        let (exit_tx, exit) = oneshot::channel();
        std::thread::Builder::new()
            .name("embedded-postgres".to_owned())
            .spawn(move || supervise(command, spawned_tx, signals_rx, exit_tx))?;
        let pid = spawned_rx.await.map_err(|_| {
            io::Error::other("the supervisor thread ended before spawning postgres")
        })??;
        Ok(Self { pid, signals, exit })
    }

    /// Asks the supervisor to signal postgres; a no-op once postgres has exited.
    pub(super) fn signal(&self, signal: Signal) {
        let _ = self.signals.send(signal);
    }

    /// Waits until postgres exits; its exit report.
    pub(super) async fn exited(&mut self) -> ExitReport {
        (&mut self.exit)
            .await
            .unwrap_or_else(|_| Err(supervisor_vanished()))
    }

    /// The exit report if postgres has exited. After `Some`, the server is done
    /// and must not be waited on again.
    pub(super) fn try_exit(&mut self) -> Option<ExitReport> {
        match self.exit.try_recv() {
            Ok(report) => Some(report),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(supervisor_vanished())),
        }
    }

    /// SIGINT (fast shutdown), then SIGQUIT (immediate shutdown), then SIGKILL,
    /// each followed by a bounded wait.
    pub(super) async fn shutdown(mut self) -> Result<(), EmbeddedError> {
        let steps = [
            (Signal::SIGINT, STOP_TIMEOUT),
            (Signal::SIGQUIT, ESCALATION_TIMEOUT),
            (Signal::SIGKILL, ESCALATION_TIMEOUT),
        ];
        for (signal, grace) in steps {
            self.signal(signal);
            match tokio::time::timeout(grace, &mut self.exit).await {
                Ok(report) => {
                    let report = report.unwrap_or_else(|_| Err(supervisor_vanished()));
                    debug!(pid = self.pid, exit = %describe_exit(&report), "postgres exited");
                    return Ok(());
                }
                Err(_) => warn!(
                    pid = self.pid,
                    %signal,
                    "postgres did not exit within {} s, escalating",
                    grace.as_secs()
                ),
            }
        }
        Err(EmbeddedError::StopFailed { pid: self.pid })
    }
}

pub(super) fn supervisor_vanished() -> io::Error {
    io::Error::other("the supervisor thread ended without reporting")
}

/// Body of the supervisor thread.
pub(super) fn supervise(
    mut command: Command,
    spawned: oneshot::Sender<io::Result<i32>>,
    signals: mpsc::Receiver<Signal>,
    exited: oneshot::Sender<ExitReport>,
) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let _ = spawned.send(Err(error));
            return;
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    if spawned.send(Ok(pid.as_raw())).is_err() {
        // start() was cancelled: nobody will ever stop this server.
        let _ = kill(pid, Signal::SIGINT);
    }
    // Polls so that signals and reaping happen on this one thread (see `Server`).
    let report = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(error) => break Err(error),
        }
        match signals.recv_timeout(SUPERVISOR_POLL) {
            Ok(signal) => {
                let _ = kill(pid, signal);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The handle is gone (it asked for a shutdown first): just reap.
            Err(mpsc::RecvTimeoutError::Disconnected) => break child.wait(),
        }
    };
    let _ = exited.send(report);
}
