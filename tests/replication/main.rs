//! Replication: three service replicas on a Postgres primary with a
//! synchronous standby (built here from the installed binaries) and a
//! Redis of the test's own.
//!
//! - read-your-writes: each create goes through one replica and is read
//!   back at once through another, with the create's consistency token;
//!   the replicas read from the standby (`--database-replica-url`). Then
//!   again with the standby's replay paused: the token still sees every
//!   write, while reads without it miss some until the standby falls past
//!   `--max-replica-lag` and reads leave it.
//! - shared limit: a key limited to 100 calls/s calling the three replicas
//!   round-robin gets 100/s in all (within 10%).
//! - failover: CreateUser load through a client that round-robins the
//!   replicas and retries UNAVAILABLE and transport errors with the same
//!   request id; one replica is killed (SIGKILL), then the primary, and
//!   the standby is promoted. Afterwards every acknowledged create is on
//!   the new primary, none twice, writes succeeded again within 10 s of the
//!   promotion, and no INTERNAL (nor any code but those) was seen.
//!
//! It prints its figures (BENCHMARKS.md quotes them).

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "../api/process.rs"]
mod process;

mod cluster;

use std::{
    collections::BTreeMap,
    error::Error as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::{Code, Request};
use users_service::{auth::Role, code::code_name, pb::v1 as pb};

use cluster::{Pair, free_port};
use helpers::{Bearer, ChildServer, Users};
use process::{Database, ServiceProcess, Start};

const DATABASE: &str = "replication";
const REPLICAS: usize = 3;
/// Creates read back through another replica.
const READ_BACKS: usize = 300;
/// The rate of the limited key.
const LIMIT: u32 = 100;
/// Concurrent callers with the limited key, each calling every 2 ms or
/// so: about 15 times the limit.
const LIMITED_CALLERS: usize = 4;
/// Concurrent callers in the failover.
const CALLERS: usize = 6;
/// Slower than this from the promotion to a write fails the run.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
const CONSISTENCY: &str = "x-users-consistency";

/// One service replica and how to reach it.
struct Replica {
    process: ServiceProcess,
    metrics: SocketAddr,
}

impl Replica {
    fn users(&self, token: &str) -> Users {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", self.process.addr))
                .unwrap()
                .connect_lazy();
        pb::users_service_client::UsersServiceClient::with_interceptor(
            channel,
            Bearer::new(Some(token)),
        )
    }

    /// The sum of the samples of `metric` whose labels contain `labels`.
    async fn metric(&self, metric: &str, labels: &str) -> f64 {
        let body = helpers::scrape(self.metrics).await;
        body.lines()
            .filter(|line| line.starts_with(metric) && line.contains(labels))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

async fn start_replicas(pair: &Pair, redis: &ChildServer) -> Vec<Replica> {
    // One data directory: the first replica makes the admin key there,
    // the others find it.
    let data_dir = helpers::scratch_dir("replication-service");
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let args = [
            "--database-replica-url".to_owned(),
            pair.standby.url(DATABASE),
            "--redis-url".to_owned(),
            format!("redis://127.0.0.1:{}", redis.port),
            "--replicas-hint".to_owned(),
            REPLICAS.to_string(),
            // The admin key is not what is limited here.
            "--rate-limit-per-second".to_owned(),
            "1000000".to_owned(),
            "--health-interval".to_owned(),
            "200ms".to_owned(),
            "--shutdown-grace".to_owned(),
            "1s".to_owned(),
            "--metrics-listen".to_owned(),
            metrics.to_string(),
        ];
        let process = ServiceProcess::start(Start {
            database: Database::Url(pair.url(DATABASE)),
            data_dir: Some(data_dir.clone()),
            args: args.to_vec(),
            ..Default::default()
        })
        .await;
        replicas.push(Replica { process, metrics });
    }
    // Reads go to the standby once the replicas have measured its lag.
    for replica in &replicas {
        wait_for_metric(replica, "users_service_replica_usable", 1.0).await;
    }
    replicas
}

async fn wait_for_metric(replica: &Replica, metric: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while replica.metric(metric, "").await != value {
        assert!(Instant::now() < deadline, "{metric} did not become {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn new_user(email: String) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        user: Some(pb::User {
            email,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates a user through `writer`; the user and the consistency token.
async fn create(writer: &mut Users, email: String) -> (pb::User, String) {
    let response = writer.create_user(new_user(email)).await.unwrap();
    let token = response
        .metadata()
        .get(CONSISTENCY)
        .expect("a write answers with a consistency token")
        .to_str()
        .unwrap()
        .to_owned();
    (response.into_inner().user.unwrap(), token)
}

/// GetUser of `id` through `reader`, with `token` when given: whether found.
async fn found(reader: &mut Users, id: &str, token: Option<&str>) -> bool {
    let mut request = Request::new(pb::GetUserRequest {
        id: id.to_owned(),
        ..Default::default()
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert(CONSISTENCY, token.parse().unwrap());
    }
    match reader.get_user(request).await {
        Ok(response) => response.into_inner().user.unwrap().id == id,
        Err(status) if status.code() == Code::NotFound => false,
        Err(status) => panic!("GetUser failed: {status:?}"),
    }
}

async fn standby_reads(replicas: &[Replica]) -> (f64, f64) {
    let mut standby = 0.0;
    let mut primary = 0.0;
    for replica in replicas {
        standby += replica
            .metric("users_service_reads_total", "from=\"standby\"")
            .await;
        primary += replica
            .metric("users_service_reads_total", "from=\"primary\"")
            .await;
    }
    (standby, primary)
}

async fn read_your_writes(replicas: &[Replica], pair: &Pair) -> Vec<String> {
    let token = &replicas[0].process.admin_token;
    let mut clients: Vec<Users> = replicas.iter().map(|r| r.users(token)).collect();
    let mut failures = Vec::new();

    let mut seen = 0;
    for i in 0..READ_BACKS {
        let (user, consistency) =
            create(&mut clients[i % REPLICAS], format!("ryw-{i}@example.com")).await;
        if found(
            &mut clients[(i + 1) % REPLICAS],
            &user.id,
            Some(&consistency),
        )
        .await
        {
            seen += 1;
        }
        if i % 10 == 0 {
            let mut request = Request::new(pb::ListUsersRequest {
                search: user.email.clone(),
                ..Default::default()
            });
            request
                .metadata_mut()
                .insert(CONSISTENCY, consistency.parse().unwrap());
            let listed = clients[(i + 2) % REPLICAS]
                .list_users(request)
                .await
                .unwrap()
                .into_inner();
            if listed.data.len() != 1 {
                failures.push(format!("ListUsers with the token missed {}", user.email));
            }
        }
    }
    let (from_standby, from_primary) = standby_reads(replicas).await;
    println!(
        "read-your-writes: {seen}/{READ_BACKS} creates read back at once through another replica with their token; \
         reads from the standby {from_standby}, from the primary {from_primary}"
    );
    if seen != READ_BACKS {
        failures.push(format!("read back {seen} of {READ_BACKS} writes"));
    }
    if from_standby == 0.0 {
        failures.push("no read went to the standby".into());
    }
    // Each replica told the others of its commits.
    for (i, replica) in replicas.iter().enumerate() {
        let told = replica
            .metric(
                "users_service_notifications_total",
                "channel=\"user_events\"",
            )
            .await;
        if told == 0.0 {
            failures.push(format!(
                "replica {i} counted no notification of the others' commits"
            ));
        }
    }

    // The standby holds the writes (a synchronous standby flushes them)
    // but does not show them until it replays them.
    pair.standby
        .execute("postgres", "SELECT pg_wal_replay_pause()")
        .await;
    let paused = Instant::now();
    let (mut with_token, mut without_token, mut rounds) = (0, 0, 0);
    while paused.elapsed() < Duration::from_millis(600) {
        let (user, consistency) = create(
            &mut clients[rounds % REPLICAS],
            format!("paused-{rounds}@example.com"),
        )
        .await;
        let reader = &mut clients[(rounds + 1) % REPLICAS];
        if found(reader, &user.id, None).await {
            without_token += 1;
        }
        if found(reader, &user.id, Some(&consistency)).await {
            with_token += 1;
        }
        rounds += 1;
    }
    println!(
        "replay paused: {with_token}/{rounds} writes seen with their token, {without_token}/{rounds} without it"
    );
    if with_token != rounds {
        failures.push(format!(
            "with replay paused, the token saw {with_token} of {rounds} writes"
        ));
    }
    if without_token == rounds {
        failures
            .push("with replay paused, reads without the token never went to the standby".into());
    }
    // Past --max-replica-lag, reads leave the standby: without a token
    // too, each write is seen.
    for replica in replicas {
        wait_for_metric(replica, "users_service_replica_usable", 0.0).await;
    }
    let (user, _) = create(&mut clients[0], "late@example.com".into()).await;
    if !found(&mut clients[1], &user.id, None).await {
        failures.push("a standby past the lag allowed was still read from".into());
    }
    println!(
        "replay paused: reads left the standby {:.1} s after the pause",
        paused.elapsed().as_secs_f64()
    );
    pair.standby
        .execute("postgres", "SELECT pg_wal_replay_resume()")
        .await;
    for replica in replicas {
        wait_for_metric(replica, "users_service_replica_usable", 1.0).await;
    }

    // A token that is not one is refused.
    let mut request = Request::new(pb::GetUserRequest {
        id: user.id.clone(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert(CONSISTENCY, "not-a-position".parse().unwrap());
    let refused = clients[0].get_user(request).await.unwrap_err();
    if refused.code() != Code::InvalidArgument {
        failures.push(format!("a malformed token: {refused:?}"));
    }
    failures
}

async fn shared_limit(replicas: &[Replica], pair: &Pair) -> Vec<String> {
    let key = helpers::create_key(
        &pair.primary.config(DATABASE),
        Role::Admin,
        None,
        Some(LIMIT),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let passed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let callers: Vec<_> = (0..LIMITED_CALLERS)
        .map(|caller| {
            let mut clients: Vec<Users> = replicas.iter().map(|r| r.users(&key)).collect();
            let (stop, counting, passed) = (
                Arc::clone(&stop),
                Arc::clone(&counting),
                Arc::clone(&passed),
            );
            tokio::spawn(async move {
                let mut n = caller;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    // A malformed id: INVALID_ARGUMENT once past the limit.
                    let outcome = clients[n % REPLICAS]
                        .get_user(pb::GetUserRequest {
                            id: "-".into(),
                            ..Default::default()
                        })
                        .await;
                    match outcome.map(|_| Code::Ok).unwrap_or_else(|s| s.code()) {
                        Code::InvalidArgument => {
                            if counting.load(Ordering::Relaxed) {
                                passed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Code::ResourceExhausted => {}
                        other => panic!("a limited call answered {other:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    // The burst goes first; then the steady rate.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    counting.store(true, Ordering::Relaxed);
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;
    counting.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    let rate = passed.load(Ordering::Relaxed) as f64 / window.as_secs_f64();
    let fallbacks: usize = replicas
        .iter()
        .map(|replica| {
            replica
                .process
                .log_lines()
                .iter()
                .filter(|line| {
                    line["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("limits alone"))
                        || line["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("limits alone"))
                })
                .count()
        })
        .sum();
    println!("shared limit: the replicas fell back to limiting alone {fallbacks} times");
    println!(
        "shared limit: a key limited to {LIMIT}/s, {LIMITED_CALLERS} callers round-robin over {REPLICAS} replicas: {rate:.1} calls/s passed over {} s",
        window.as_secs()
    );
    let expected = f64::from(LIMIT);
    if (rate - expected).abs() > expected * 0.1 {
        vec![format!(
            "the shared limit let {rate:.1}/s through, not {expected}/s"
        )]
    } else {
        Vec::new()
    }
}

/// What the failover's callers saw.
#[derive(Default)]
struct Seen {
    /// Each acknowledged create: its id, email, and when it was answered.
    acknowledged: Vec<(String, String, Instant)>,
    /// Answers by code; `(client)`: made by the client library for a call
    /// the server did not answer.
    codes: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
    /// Creates given up on (retried past the test's end).
    abandoned: u64,
}

fn retryable(status: &tonic::Status) -> bool {
    // A dropped connection is reported by tonic as UNKNOWN "transport
    // error" (or CANCELLED, UNAVAILABLE) with the transport error as
    // its source.
    status.code() == Code::Unavailable
        || status.code() == Code::DeadlineExceeded
        || status.source().is_some()
}

async fn failover(mut replicas: Vec<Replica>, mut pair: Pair) -> Vec<String> {
    let token = replicas[0].process.admin_token.clone();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let mut clients: Vec<Users> = replicas.iter().map(|r| r.users(&token)).collect();
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut turn = caller;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let email = format!("failover-{caller}-{n}@example.com");
                    let request_id = uuid::Uuid::new_v4().to_string();
                    let started = Instant::now();
                    loop {
                        turn += 1;
                        let mut request = Request::new(pb::CreateUserRequest {
                            request_id: request_id.clone(),
                            ..new_user(email.clone())
                        });
                        request.set_timeout(Duration::from_secs(5));
                        let outcome = clients[turn % REPLICAS].create_user(request).await;
                        let done = {
                            let mut seen = seen.lock().unwrap();
                            match outcome {
                                Ok(response) => {
                                    *seen.codes.entry("OK".into()).or_default() += 1;
                                    let user = response.into_inner().user.unwrap();
                                    seen.acknowledged.push((
                                        user.id,
                                        email.clone(),
                                        Instant::now(),
                                    ));
                                    true
                                }
                                Err(status) => {
                                    let client_made = status.source().is_some();
                                    let key = format!(
                                        "{}{}",
                                        code_name(status.code()),
                                        if client_made { " (client)" } else { "" }
                                    );
                                    *seen.codes.entry(key.clone()).or_default() += 1;
                                    seen.examples
                                        .entry(key)
                                        .or_insert_with(|| format!("{status:?}"));
                                    let given_up = stop.load(Ordering::Relaxed)
                                        && started.elapsed() > Duration::from_secs(30);
                                    if given_up {
                                        seen.abandoned += 1;
                                    }
                                    !retryable(&status) || given_up
                                }
                            }
                        };
                        if done {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    let acknowledged = || seen.lock().unwrap().acknowledged.len();
    let progress = async |more: usize| {
        let target = acknowledged() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while acknowledged() < target {
            assert!(Instant::now() < deadline, "the load made no progress");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    progress(300).await;

    // One replica dies; the clients' calls move to the others.
    let mut dead = replicas.pop().unwrap();
    dead.process.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = dead.process.wait_exit(Duration::from_secs(5)).await;
    progress(300).await;

    // The primary dies; the standby, which has every acknowledged commit,
    // is promoted.
    let killed = Instant::now();
    pair.primary.kill();
    pair.promote().await;
    let promoted = Instant::now();
    progress(300).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    let seen = Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap();
    let recovered = seen
        .acknowledged
        .iter()
        .map(|(_, _, at)| *at)
        .find(|at| *at > promoted)
        .map(|at| at - promoted);

    // What the new primary holds.
    let rows = pair
        .standby
        .execute(
            DATABASE,
            "SELECT id::text, email FROM users WHERE email LIKE 'failover-%'",
        )
        .await;
    let stored: std::collections::HashMap<String, String> = rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect();
    let mut per_email: BTreeMap<&str, usize> = BTreeMap::new();
    for email in stored.values() {
        *per_email.entry(email).or_default() += 1;
    }
    let duplicates = per_email.values().filter(|n| **n > 1).count();
    let lost = seen
        .acknowledged
        .iter()
        .filter(|(id, email, _)| stored.get(id) != Some(email))
        .count();
    let first_write_after = |since: Instant| {
        seen.acknowledged
            .iter()
            .map(|(_, _, at)| *at)
            .find(|at| *at > since)
            .map_or("never".to_owned(), |at| {
                format!("{:.2} s", (at - since).as_secs_f64())
            })
    };
    println!(
        "failover: {} creates acknowledged, {lost} lost, {duplicates} duplicated; the first write {} after the kill \
         of the primary, {} after the promotion (which took {:.2} s); answers {:?}",
        seen.acknowledged.len(),
        first_write_after(killed),
        first_write_after(promoted),
        (promoted - killed).as_secs_f64(),
        seen.codes,
    );
    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} acknowledged creates are missing"));
    }
    if duplicates > 0 {
        failures.push(format!("{duplicates} creates were stored twice"));
    }
    if recovered.is_none_or(|d| d > RECOVERY_LIMIT) {
        failures.push(format!(
            "writes did not recover within {RECOVERY_LIMIT:?}: {recovered:?}"
        ));
    }
    let unexpected: Vec<_> = seen
        .codes
        .iter()
        .filter(|(code, _)| {
            !(code.as_str() == "OK" || code.as_str() == "UNAVAILABLE" || code.ends_with("(client)"))
        })
        .map(|(code, n)| {
            format!(
                "{code} x{n}: {}",
                seen.examples.get(code.as_str()).map_or("", |e| e)
            )
        })
        .collect();
    if !unexpected.is_empty() {
        failures.push(format!(
            "answers other than OK and UNAVAILABLE: {unexpected:?}"
        ));
    }
    if seen.abandoned > 0 {
        failures.push(format!("{} creates were never answered", seen.abandoned));
    }
    drop(replicas);
    failures
}

#[tokio::main]
async fn main() {
    let started = Instant::now();
    let redis = helpers::redis_server();
    let dir = helpers::scratch_dir("replication");
    let pair = Pair::start(&dir).await;
    let replicas = start_replicas(&pair, &redis).await;
    let mut failures = read_your_writes(&replicas, &pair).await;
    failures.extend(shared_limit(&replicas, &pair).await);
    failures.extend(failover(replicas, pair).await);
    println!("replication: {:.0} s", started.elapsed().as_secs_f64());
    for failure in &failures {
        println!("FAILED: {failure}");
    }
    assert!(failures.is_empty(), "{} failures", failures.len());
}
