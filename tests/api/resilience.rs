//! What the service does when its database is slow, gone or restarting, and
//! when it is told to stop.

use std::time::{Duration, Instant};

use crate::helpers::scratch_dir;

/// Runs the service against `url` until it exits on its own; its exit
/// status, its stderr and how long it ran.
async fn run_until_exit(url: &str, extra: &[&str]) -> (std::process::ExitStatus, String, Duration) {
    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_users-service"))
            .args(["--listen", "127.0.0.1:0", "--database-url", url])
            .arg("--data-dir")
            .arg(scratch_dir("unreachable"))
            .args(extra)
            .env_remove("DATABASE_URL")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the service gives up within 30 s")
    .expect("the service runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn startup_waits_for_a_database_that_never_answers_then_exits_with_the_cause() {
    // Accepts connections (the kernel does, into the backlog) and never speaks.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let (status, stderr, took) = run_until_exit(
        &format!("postgres://postgres@127.0.0.1:{port}/users"),
        &[
            "--db-startup-timeout",
            "3s",
            "--db-connect-timeout",
            "500ms",
        ],
    )
    .await;
    assert!(!status.success(), "{stderr}");
    assert!(took < Duration::from_secs(8), "gave up after {took:?}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")) && stderr.contains("no answer within 500ms"),
        "{stderr}"
    );
    let attempts = stderr.matches("cannot reach the database yet").count();
    assert!(attempts >= 2, "each attempt is logged: {stderr}");
    drop(silent);
}

#[tokio::test]
async fn startup_against_a_refused_port_retries_then_exits_with_the_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (status, stderr, took) = run_until_exit(
        &format!("postgres://postgres@127.0.0.1:{port}/users"),
        &["--db-startup-timeout", "2s"],
    )
    .await;
    assert!(!status.success(), "{stderr}");
    assert!(took >= Duration::from_millis(1500), "it retried: {took:?}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")) && stderr.contains("refused"),
        "{stderr}"
    );
}
