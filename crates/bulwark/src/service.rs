//! Running under systemd (`Type=notify`, sd_notify(3)): READY=1 once the node serves,
//! STOPPING=1 when it stops, and watchdog keep-alives sent from the async runtime, so
//! a runtime that stops making progress is restarted by systemd. Without
//! `$NOTIFY_SOCKET` (not started by systemd) all of this does nothing.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where systemd listens, from `$NOTIFY_SOCKET`: a path, or an abstract name (`@...`).
fn notify_socket() -> Option<String> {
    std::env::var("NOTIFY_SOCKET")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Sends one notification (`READY=1`, `WATCHDOG=1`, ...) to systemd, if it asked for
/// them.
pub fn notify(state: &str) -> io::Result<()> {
    let Some(addr) = notify_socket() else {
        return Ok(());
    };
    let socket = UnixDatagram::unbound()?;
    match addr.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &a)?;
        }
        None => {
            socket.send_to(state.as_bytes(), PathBuf::from(addr))?;
        }
    }
    Ok(())
}

/// The node serves: tells systemd, and keeps its watchdog fed from the runtime for as
/// long as the runtime runs (at half the `WatchdogSec=` interval, as sd_watchdog_enabled(3)
/// advises).
pub fn ready(rt: &tokio::runtime::Handle) {
    if let Err(e) = notify("READY=1") {
        tracing::warn!(error = %e, "cannot tell systemd the node is ready");
    }
    let Some(every) = watchdog_interval() else {
        return;
    };
    rt.spawn(async move {
        let mut tick = tokio::time::interval(every / 2);
        loop {
            tick.tick().await;
            if let Err(e) = notify("WATCHDOG=1") {
                tracing::warn!(error = %e, "cannot feed the systemd watchdog");
            }
        }
    });
}

/// `WatchdogSec=` as systemd passes it (`$WATCHDOG_USEC`, for this process only when
/// `$WATCHDOG_PID` names it).
fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test owns the environment variables (tests run in parallel threads).
    #[test]
    fn notifications_reach_the_socket_and_the_watchdog_is_fed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "200000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut buf = [0u8; 64];
        rt.block_on(async {
            ready(&tokio::runtime::Handle::current());
            tokio::time::sleep(Duration::from_millis(250)).await;
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = listener.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        assert_eq!(got[0], "READY=1");
        assert!(got[1..].iter().all(|m| m == "WATCHDOG=1"), "{got:?}");
        // Another process's watchdog is not ours; no socket means nothing to do.
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(watchdog_interval(), None);
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(notify("READY=1").is_ok());
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
    }
}
