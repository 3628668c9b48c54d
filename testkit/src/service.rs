//! `tally` services as child processes: started with their output in a log file, waited on
//! until they answer, stopped by their pid.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How often [`Service::wait_healthy`] asks.
const HEALTH_POLL: Duration = Duration::from_millis(50);

/// A running child process. Contract: it is stopped (SIGKILL, by its pid) when dropped, so an
/// error or a failing test anywhere stops what it started.
#[derive(Debug)]
pub struct Service {
    /// What the caller calls it (`aggregator`, `api-idle`, ...), for messages.
    pub name: String,
    child: Option<Child>,
    /// Where its standard error goes.
    pub log: PathBuf,
}

impl Service {
    /// Starts `command` with no input, its standard output discarded and its standard error
    /// written to `log` (created or truncated).
    pub fn start(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Service> {
        let file = std::fs::File::create(&log).with_context(|| format!("failed to create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("failed to start {name} ({:?})", command.get_program()))?;
        Ok(Service { name: name.to_string(), child: Some(child), log })
    }

    /// The process id; `None` once the service was stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How the process ended, if it has (the process is reaped); `None` while it runs or
    /// after [`Service::stop`].
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// Whether the process is still running (not exited, not stopped).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Fails if the process has exited, pointing at its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.exit_status() {
            Some(status) => bail!("{} exited ({status}); its log: {}", self.name, self.log.display()),
            None => Ok(()),
        }
    }

    /// Waits until `GET <base_url>/healthz` answers 2xx; fails as soon as the process exits,
    /// or after `timeout`, pointing at its log.
    pub async fn wait_healthy(&mut self, base_url: &str, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let healthz = format!("{base_url}/healthz");
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            if client.get(&healthz).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not answer {healthz} within {timeout:?}; its log: {}", self.name, self.log.display());
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// Stops the process now (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where free ports are looked for when the kernel's ephemeral range cannot be read.
const DEFAULT_EPHEMERAL_START: u16 = 32768;
/// The lowest port handed out.
const LOWEST_PORT: u16 = 10_000;

/// A free loopback port (bound and released; the service binds it right after).
///
/// Picked at random below the kernel's ephemeral range, not by binding port 0: a port from
/// that range can be taken, between this probe and the service's bind, as the local port of
/// any outgoing connection on the machine (tests and the bench open thousands), and the
/// service then fails with "address already in use". Below the range only another probe
/// can take it, one chance in thousands per pair of services starting at the same instant.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START);
    let (low, high) = (LOWEST_PORT, ephemeral_start.max(2 * LOWEST_PORT));
    for _ in 0..1000 {
        let port = low + (uuid::Uuid::new_v4().as_u128() % u128::from(high - low)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {low}..{high}")
}

/// A free loopback address, `127.0.0.1:<port>` ([`free_port`]).
pub fn free_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tally-testkit-{}-{name}.log", crate::random_id()))
    }

    #[test]
    fn a_free_port_can_be_bound_and_lies_below_the_ephemeral_range() {
        let port = free_port().unwrap();
        assert!(port >= LOWEST_PORT);
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn a_service_is_stopped_when_dropped() {
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let log = log_path("sleep");
        let mut service = Service::start("sleep", sleep, log.clone()).unwrap();
        let pid = service.pid().unwrap();
        assert!(service.is_running());
        drop(service);
        // Reaped: no process has that pid any more (or a new one, not our sleep).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");
        std::fs::remove_file(log).unwrap();
    }

    #[tokio::test]
    async fn waiting_on_a_service_that_exited_fails_at_once_naming_its_log() {
        let mut fail = Command::new("sh");
        fail.args(["-c", "echo broken >&2; exit 3"]);
        let log = log_path("fail");
        let mut service = Service::start("fail", fail, log.clone()).unwrap();
        let started = Instant::now();
        let port = free_port().unwrap();
        let e = service.wait_healthy(&format!("http://127.0.0.1:{port}"), Duration::from_secs(30)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());
        assert!(e.to_string().contains(&log.display().to_string()), "{e}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "broken\n");
        std::fs::remove_file(log).unwrap();
    }
}
