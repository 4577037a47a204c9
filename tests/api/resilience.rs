//! What the service does when its database is slow, gone or restarting, and
//! when it is told to stop.

use std::time::{Duration, Instant};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{scratch_dir, spawn_with, start_embedded, test_config};

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

/// The status of every health entry: overall, then the two services.
async fn health_of(channel: &tonic::transport::Channel) -> [ServingStatus; 3] {
    let mut health = HealthClient::new(channel.clone());
    let mut statuses = [ServingStatus::Unknown; 3];
    for (status, service) in
        statuses
            .iter_mut()
            .zip(["", "users.v1.UsersService", "users.v1.TenantsService"])
    {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers");
        *status = response.into_inner().status();
    }
    statuses
}

/// Polls health until `want`, for at most `within`; how long it took.
async fn health_becomes(
    channel: &tonic::transport::Channel,
    want: [ServingStatus; 3],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let now = health_of(channel).await;
        if now == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "health still {now:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server on a Postgres of the test's own (in `dir`), which the test may
/// stop and start, probing it every `health_interval`; serving.
async fn app_on_own_postgres(
    dir: &std::path::Path,
    health_interval: Duration,
) -> (
    crate::helpers::TestApp,
    users_service::embedded_pg::EmbeddedPostgres,
) {
    let cluster = start_embedded(dir, true).await;
    let url = format!(
        "host={} user=postgres dbname=readiness",
        cluster.socket_dir().display()
    );
    let mut config = test_config(Some(url));
    config.health_interval = health_interval;
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let app = spawn_with(config).await;
    health_becomes(
        &app.channel,
        [ServingStatus::Serving; 3],
        Duration::from_secs(2),
    )
    .await;
    (app, cluster)
}

#[tokio::test]
async fn readiness_follows_the_database_and_liveness_does_not() {
    use ServingStatus::{NotServing, Serving};
    let dir = scratch_dir("readiness");
    let (app, cluster) = app_on_own_postgres(&dir, Duration::from_millis(200)).await;

    let ready = async || {
        let text = crate::metrics::scrape(app.metrics_addr.unwrap()).await;
        let value = |name| crate::metrics::sample(&text, name, &[]);
        (
            value("users_service_database_ready"),
            value("users_service_database_outages_total"),
        )
    };
    assert_eq!(ready().await, (Some(1.0), Some(0.0)));

    cluster.stop().await.unwrap();
    health_becomes(
        &app.channel,
        [Serving, NotServing, NotServing],
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(ready().await, (Some(0.0), Some(1.0)));

    let cluster = start_embedded(&dir, true).await;
    health_becomes(&app.channel, [Serving; 3], Duration::from_secs(5)).await;
    assert_eq!(ready().await, (Some(1.0), Some(1.0)));
    app.shutdown().await;
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_hears_from_the_pool_before_its_next_probe() {
    use ServingStatus::{NotServing, Serving};
    let dir = scratch_dir("readiness-pool");
    // No probe of its own during the test.
    let (mut app, cluster) = app_on_own_postgres(&dir, Duration::from_secs(3600)).await;

    cluster.stop().await.unwrap();
    // Calls fail; the pool, which cannot open a connection, tells the probe.
    let mut codes = Vec::new();
    for _ in 0..3 {
        let outcome = app
            .users
            .get_user(users_service::pb::v1::GetUserRequest {
                id: uuid::Uuid::now_v7().to_string(),
                ..Default::default()
            })
            .await;
        codes.push(outcome.map_or_else(|status| status.code(), |_| tonic::Code::Ok));
    }
    assert!(codes.contains(&tonic::Code::Unavailable), "{codes:?}");
    health_becomes(
        &app.channel,
        [Serving, NotServing, NotServing],
        Duration::from_secs(2),
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn health_checks_are_never_shed_nor_rate_limited() {
    let mut app = crate::limits::app_with(|c| {
        c.max_in_flight = 1;
        c.rate_limit_per_second = 1;
        c.rate_limit_burst = Some(1);
    })
    .await;
    let user = crate::users::create(&mut app, crate::users::roq_user()).await;
    // The one in-flight slot is taken by an update waiting for a row lock.
    let lock = crate::limits::lock_user_row(&app, &user.id).await;
    let held = crate::limits::spawn_held_update(&app, &user.id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        assert_eq!(health_of(&app.channel).await, [ServingStatus::Serving; 3]);
    }
    lock.batch_execute("ROLLBACK").await.unwrap();
    let _ = held.await;
}

#[tokio::test]
async fn a_killed_embedded_postgres_is_started_again_and_nothing_acknowledged_is_lost() {
    use std::sync::{Arc, Mutex};
    let dir = scratch_dir("supervised");
    let mut config = test_config(None);
    config.data_dir = dir.clone();
    config.health_interval = Duration::from_millis(200);
    let app = spawn_with(config).await;
    let (_, start) = crate::watch::watch(&mut app.users.clone(), Default::default()).await;

    // Creates on four callers, keeping every id the service acknowledged.
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let codes = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u32>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (mut users, acknowledged, codes, stop) = (
                app.users.clone(),
                Arc::clone(&acknowledged),
                Arc::clone(&codes),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let mut request =
                        tonic::Request::new(users_service::pb::v1::CreateUserRequest {
                            user: Some(crate::users::user(&format!("w{worker}-{n}"), "")),
                            ..Default::default()
                        });
                    request.set_timeout(Duration::from_secs(5));
                    let outcome = users.create_user(request).await;
                    let code = outcome
                        .as_ref()
                        .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
                    *codes
                        .lock()
                        .unwrap()
                        .entry(format!("{code:?}"))
                        .or_default() += 1;
                    match outcome {
                        Ok(response) => acknowledged
                            .lock()
                            .unwrap()
                            .push(response.into_inner().user.unwrap().id),
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;

    let before = acknowledged.lock().unwrap().len();
    crate::helpers::kill_postmaster(&dir);
    let killed = Instant::now();
    // Readiness says so while it is down...
    health_becomes(
        &app.channel,
        [
            ServingStatus::Serving,
            ServingStatus::NotServing,
            ServingStatus::NotServing,
        ],
        Duration::from_secs(5),
    )
    .await;
    // ...and creates succeed again within 10 s.
    loop {
        let now = acknowledged.lock().unwrap().len();
        if now > before + 10 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "not serving 10 s after postgres was killed: {:?}",
            codes.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = killed.elapsed();
    health_becomes(
        &app.channel,
        [ServingStatus::Serving; 3],
        Duration::from_secs(5),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }

    let stored = crate::helpers::stored_user_ids(&app.db_config).await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    let codes = codes.lock().unwrap().clone();
    println!(
        "serving again {recovered:?} after the kill; {} creates acknowledged, {} lost; codes {codes:?}",
        acknowledged.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert!(
        codes
            .keys()
            .all(|code| ["Ok", "Unavailable"].contains(&code.as_str())),
        "only OK and UNAVAILABLE: {codes:?}"
    );
    // The change feed, resumed from before the kill, has every stored user
    // once: the token outlived the Postgres that made it.
    let (mut feed, _) =
        crate::watch::watch(&mut app.users.clone(), crate::watch::from(&start)).await;
    let created: Vec<String> = crate::watch::events(&mut feed, stored.len())
        .await
        .into_iter()
        .map(|event| event.user.unwrap().id)
        .collect();
    assert_eq!(
        created.iter().collect::<std::collections::HashSet<_>>(),
        stored.iter().collect()
    );
    app.shutdown().await;
}

#[tokio::test]
async fn sigterm_answers_every_call_ok_or_unavailable_and_leaves_no_statement_running() {
    use crate::process::{ServiceProcess, Start};
    use std::sync::{Arc, Mutex};
    let mut service = ServiceProcess::start(Start {
        args: ["--shutdown-grace", "2s"].map(String::from).to_vec(),
        ..Default::default()
    })
    .await;
    let user = service.create_user(crate::users::roq_user()).await;
    let config = crate::helpers::server().config(&service.database);
    let (db, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // An update that will still be waiting for this row lock at the end of
    // the grace period.
    let (locker, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM users WHERE id = '{}' FOR UPDATE",
            user.id
        ))
        .await
        .unwrap();
    let held = {
        let mut users = service.users().await;
        let id = user.id.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            let outcome = users
                .update_user(users_service::pb::v1::UpdateUserRequest {
                    id,
                    user: Some(users_service::pb::v1::UserUpdate {
                        first_name: Some("Late".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await;
            (outcome.map(|_| ()), began.elapsed())
        })
    };

    // Callers that keep calling, on connections of their own, through the
    // shutdown; each call's code and duration is kept.
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (addr, token, id) = (service.addr, service.admin_token.clone(), user.id.clone());
        let (outcomes, stop) = (Arc::clone(&outcomes), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A fresh connection now and then, as new clients arrive.
                let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy();
                let mut users = users_service::pb::v1::users_service_client::UsersServiceClient::with_interceptor(
                    channel,
                    crate::helpers::Bearer::new(Some(&token)),
                );
                for call in 0..20 {
                    let began = Instant::now();
                    let outcome = users
                        .get_user(users_service::pb::v1::GetUserRequest { id: id.clone(), ..Default::default() })
                        .await;
                    // The first call of a connection that the closing
                    // listener accepted in the kernel but never served
                    // fails in the client, which makes up UNKNOWN
                    // "transport error" for it (see the README): it never
                    // reached the server.
                    let unserved = matches!(&outcome, Err(status)
                        if call == 0
                            && status.code() == tonic::Code::Unknown
                            && status.message().contains("transport error"));
                    if unserved {
                        continue;
                    }
                    let code = outcome.map_or_else(|status| status.code(), |_| tonic::Code::Ok);
                    outcomes.lock().unwrap().push((code, began.elapsed()));
                    if code != tonic::Code::Ok {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (exit, took) = service.terminate(Duration::from_secs(10)).await;
    // Right after the exit: nothing of the service runs in Postgres.
    let running: Vec<String> = db
        .query(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'users-service' AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(4), "exited after {took:?}");
    assert!(running.is_empty(), "still running after exit: {running:?}");

    let (held, held_for) = held.await.unwrap();
    let status = held.expect_err("the held update did not finish");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(held_for < Duration::from_secs(4), "{held_for:?}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    let name: String = db
        .query_one(
            "SELECT first_name FROM users WHERE id::text = $1",
            &[&user.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "Anna", "the cancelled update left nothing behind");

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let unexpected: Vec<_> = outcomes
        .iter()
        .filter(|(code, took)| {
            !matches!(code, tonic::Code::Ok | tonic::Code::Unavailable)
                || *took > Duration::from_secs(3)
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} of {} calls ended otherwise: {unexpected:?}",
        unexpected.len(),
        outcomes.len()
    );
}

#[tokio::test]
async fn a_service_started_right_after_a_sigkill_waits_for_the_old_postgres_and_keeps_its_data() {
    use crate::process::{Database, ServiceProcess, Start};
    let data_dir = scratch_dir("sigkill-restart");
    let start = Start {
        database: Database::Embedded,
        data_dir: Some(data_dir.clone()),
        ..Default::default()
    };
    let mut first = ServiceProcess::start(start.clone()).await;
    let created = first.create_user(crate::users::roq_user()).await;
    // Its postgres gets the parent's death as a signal and takes a moment
    // to stop; the next service starts meanwhile.
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("killed");
    let second = ServiceProcess::start(start).await;
    let mut users = second.users().await;
    let found = users
        .get_user(users_service::pb::v1::GetUserRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("the user survives")
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found, created);
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted when dropped;
/// None where this process may not mount (it is not root).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(size: &str) -> Option<Self> {
        if !nix::unistd::getuid().is_root() {
            return None;
        }
        let dir = scratch_dir("small-disk");
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .is_ok_and(|status| status.success());
        mounted.then_some(Self(dir))
    }

    /// Fills it up with one file; that file's path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while file.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_makes_writes_unavailable_and_they_succeed_again_once_it_is_freed() {
    let Some(disk) = SmallDisk::mount("160m") else {
        eprintln!("skipped: mounting a small file system needs root");
        return;
    };
    let mut config = test_config(None);
    config.data_dir = disk.0.clone();
    config.health_interval = Duration::from_millis(200);
    let mut app = spawn_with(config).await;
    let mut acknowledged = Vec::new();
    let create = async |app: &mut crate::helpers::TestApp, n: usize| {
        let mut request = tonic::Request::new(users_service::pb::v1::CreateUserRequest {
            user: Some(crate::users::user(&format!("r{n}"), "")),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(5));
        app.users
            .create_user(request)
            .await
            .map(|response| response.into_inner().user.unwrap().id)
    };
    for n in 0..10 {
        acknowledged.push(create(&mut app, n).await.expect("room to write"));
    }

    let filler = disk.fill();
    // Writes fail once Postgres needs a new page (or WAL), as UNAVAILABLE:
    // the server's state, not the request's.
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    let mut n = 10;
    while codes.is_empty() && n < 2_000 {
        match create(&mut app, n).await {
            Ok(id) => acknowledged.push(id),
            Err(status) => *codes.entry(format!("{:?}", status.code())).or_default() += 1,
        }
        n += 1;
    }
    for _ in 0..5 {
        if let Err(status) = create(&mut app, n).await {
            *codes.entry(format!("{:?}", status.code())).or_default() += 1;
        }
        n += 1;
    }
    assert!(!codes.is_empty(), "no write failed on a full disk");
    assert!(
        codes.keys().all(|code| code == "Unavailable"),
        "only UNAVAILABLE on a full disk: {codes:?}"
    );

    std::fs::remove_file(filler).unwrap();
    let freed = Instant::now();
    loop {
        match create(&mut app, n).await {
            Ok(id) => {
                acknowledged.push(id);
                break;
            }
            Err(status) => assert!(
                freed.elapsed() < Duration::from_secs(20),
                "writes still fail 20 s after the disk was freed: {status:?}"
            ),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    health_becomes(
        &app.channel,
        [ServingStatus::Serving; 3],
        Duration::from_secs(10),
    )
    .await;

    let stored = crate::helpers::stored_user_ids(&app.db_config).await;
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    println!(
        "full disk: {codes:?}; writable again {:?} after it was freed",
        freed.elapsed()
    );
    app.shutdown().await;
}
