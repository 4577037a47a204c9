//! Faults: the service binary under CreateUser load while its database
//! fails under it, then while it is stopped with SIGTERM.
//!
//! - embedded: the service runs its own Postgres; the postmaster is killed
//!   with SIGKILL, `FAULT_ROUNDS` times (2 by default).
//! - external: the service uses a Postgres run by this test, which is in
//!   turn stopped and started again (1 s down) and killed with SIGKILL
//!   (and restarted by the test), `FAULT_ROUNDS` times in all.
//!
//! Each scenario ends with SIGTERM under the same load. Afterwards every id
//! a client saw acknowledged is looked up in the database (`FAULT_CASES`
//! picks the scenarios, `embedded,external` by default). The run prints,
//! per scenario: creates acknowledged and lost (must be 0), the codes the
//! clients saw, the seconds from each fault to readiness SERVING again, how
//! long the SIGTERM drain took, and the log volume. The server may answer
//! only OK, UNAVAILABLE, and CANCELLED/DEADLINE_EXCEEDED for calls whose
//! clients gave up. After SIGTERM a tonic client also makes up a code of
//! its own (CANCELLED "operation was canceled", INTERNAL "h2 protocol
//! error", UNKNOWN "transport error", UNAVAILABLE "tcp connect error") for a
//! call that its closing connection never sent; those are counted as
//! `(client)`. It fails on a lost write, another code, a call unanswered
//! before SIGTERM, an unanswered create that was stored, or a recovery
//! slower than 10 s.

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "../api/process.rs"]
mod process;

use std::{
    collections::{BTreeMap, HashMap},
    error::Error as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use users_service::{
    app::EMBEDDED_DATABASE,
    code::code_name,
    embedded_pg::{Cluster, Sharing},
    pb::v1 as pb,
};

use process::{Database, ServiceProcess, Start};

/// Concurrent callers of CreateUser.
const CALLERS: usize = 8;
/// Slower than this from a fault to SERVING fails the run.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
/// The clients' deadline per call.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// Longer than this from SIGTERM to exit fails the run (grace + margin).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

fn rounds() -> usize {
    std::env::var("FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

/// What the callers saw.
#[derive(Default)]
struct Seen {
    /// The id and reference of each acknowledged create.
    acknowledged: Vec<(String, String)>,
    /// Calls per code; a code the client library made up, for a call the
    /// server did not answer, is marked `(client)`.
    codes: BTreeMap<String, u64>,
    /// The first status seen with each code but OK.
    examples: BTreeMap<String, String>,
    /// Codes the client library made up before SIGTERM.
    client_made_early: u64,
    /// The references of the creates the server did not answer.
    unanswered: Vec<String>,
}

/// CreateUser callers on connections of their own, until stopped.
struct Load {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    /// Set just before SIGTERM.
    terminating: Arc<AtomicBool>,
    callers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(service: &ServiceProcess, scenario: &'static str) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let terminating = Arc::new(AtomicBool::new(false));
        let callers = (0..CALLERS)
            .map(|caller| {
                let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
                let terminating = Arc::clone(&terminating);
                let url = format!("http://{}", service.addr);
                let token = service.admin_token.clone();
                tokio::spawn(async move {
                    let channel = tonic::transport::Channel::from_shared(url)
                        .unwrap()
                        .connect_lazy();
                    let mut users = pb::users_service_client::UsersServiceClient::with_interceptor(
                        channel,
                        helpers::Bearer::new(Some(&token)),
                    );
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let reference = format!("{scenario}-{caller}-{n}");
                        let mut request = tonic::Request::new(pb::CreateUserRequest {
                            user: Some(pb::User {
                                reference: reference.clone(),
                                email: format!("{scenario}-{caller}-{n}@example.com"),
                                ..Default::default()
                            }),
                            ..Default::default()
                        });
                        request.set_timeout(CALL_DEADLINE);
                        let outcome = users.create_user(request).await;
                        let code = outcome.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
                        {
                            let mut seen = seen.lock().unwrap();
                            match outcome {
                                Ok(response) => {
                                    *seen.codes.entry("OK".into()).or_default() += 1;
                                    let id = response.into_inner().user.unwrap().id;
                                    seen.acknowledged.push((id, reference));
                                }
                                Err(status) => {
                                    // A status the server sent has no source; one
                                    // with a transport error as its source was made
                                    // by the client library, for a call that got no
                                    // answer (its connection closed or went away).
                                    let client_made = status.source().is_some();
                                    let key = if client_made {
                                        format!("{} (client)", code_name(code))
                                    } else {
                                        code_name(code).to_owned()
                                    };
                                    *seen.codes.entry(key.clone()).or_default() += 1;
                                    seen.examples
                                        .entry(key)
                                        .or_insert_with(|| format!("{status:?}"));
                                    if client_made {
                                        seen.unanswered.push(reference);
                                        if !terminating.load(Ordering::Relaxed) {
                                            seen.client_made_early += 1;
                                        }
                                    }
                                }
                            }
                        }
                        if code != Code::Ok {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            seen,
            stop,
            terminating,
            callers,
        }
    }

    fn acknowledged(&self) -> usize {
        self.seen.lock().unwrap().acknowledged.len()
    }

    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for caller in self.callers {
            caller.await.unwrap();
        }
        Arc::try_unwrap(self.seen)
            .ok()
            .expect("the callers are done")
            .into_inner()
            .unwrap()
    }
}

/// Readiness (`users.v1.UsersService`), or None when health cannot be asked.
async fn readiness(service: &ServiceProcess) -> Option<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", service.addr))
        .unwrap()
        .connect()
        .await
        .ok()?;
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: "users.v1.UsersService".into(),
    });
    request.set_timeout(Duration::from_secs(1));
    let response = HealthClient::new(channel).check(request).await.ok()?;
    Some(response.into_inner().status())
}

/// Waits for readiness to be `want`; how long that took from `since`.
async fn readiness_becomes(service: &ServiceProcess, want: ServingStatus, since: Instant) -> f64 {
    loop {
        if readiness(service).await == Some(want) {
            return since.elapsed().as_secs_f64();
        }
        assert!(
            since.elapsed() < RECOVERY_LIMIT,
            "readiness not {want:?} {RECOVERY_LIMIT:?} after the fault"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the callers have had `more` creates acknowledged.
async fn progress(load: &Load, more: usize, since: Instant) {
    let target = load.acknowledged() + more;
    while load.acknowledged() < target {
        assert!(
            since.elapsed() < RECOVERY_LIMIT,
            "no acknowledged create {RECOVERY_LIMIT:?} after the fault"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGTERM under load; how long the service took to exit.
async fn terminate(service: &mut ServiceProcess, load: &Load) -> f64 {
    load.terminating.store(true, Ordering::Relaxed);
    let (exit, took) = service.terminate(DRAIN_LIMIT).await;
    assert!(exit.success(), "exit status {exit:?}");
    took.as_secs_f64()
}

/// What `db` holds of what the callers saw: the acknowledged ids it does
/// not hold (lost), and how many of the unanswered creates it does.
async fn look(db: &tokio_postgres::Config, seen: &Seen) -> (Vec<String>, usize) {
    let (client, connection) = db.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let stored: HashMap<String, String> = client
        .query("SELECT reference, id::text FROM users", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    // A lost create says whether its reference is stored under another id.
    let lost = seen
        .acknowledged
        .iter()
        .filter(|(id, reference)| stored.get(reference) != Some(id))
        .map(|(id, reference)| {
            let under = stored
                .iter()
                .find(|(_, stored_id)| *stored_id == id)
                .map_or("none".to_owned(), |(other, _)| other.clone());
            match stored.get(reference) {
                Some(other) => format!("{id} ({reference} stored as {other}; id under {under})"),
                None => format!("{id} ({reference} not stored; id under {under})"),
            }
        })
        .collect();
    let unanswered_stored: i64 = client
        .query_one(
            "SELECT count(*) FROM users WHERE reference = ANY($1)",
            &[&seen.unanswered],
        )
        .await
        .unwrap()
        .get(0);
    (lost, unanswered_stored as usize)
}

/// Lines and bytes the service logged (as JSON lines).
fn log_size(service: &ServiceProcess) -> (usize, usize) {
    let lines = service.log_lines();
    let bytes = lines.iter().map(|line| line.to_string().len() + 1).sum();
    (lines.len(), bytes)
}

struct Report {
    scenario: &'static str,
    /// What the recovery times count from.
    since: &'static str,
    recoveries: Vec<f64>,
    drain: f64,
    seen: Seen,
    lost: Vec<String>,
    /// How many of the creates the server did not answer were stored.
    unanswered_stored: usize,
    /// The service's log lines, all of them, and their bytes.
    log: (usize, usize),
}

impl Report {
    fn print(&self) {
        let recoveries: Vec<String> = self.recoveries.iter().map(|s| format!("{s:.2}")).collect();
        println!(
            "{:<9} acknowledged {:>6}  lost {}  seconds to SERVING again from {} [{}]  SIGTERM drain {:.2} s  codes {:?}",
            self.scenario,
            self.seen.acknowledged.len(),
            self.lost.len(),
            self.since,
            recoveries.join(", "),
            self.drain,
            self.seen.codes,
        );
        for (code, message) in &self.seen.examples {
            println!("{:<9} {code}: {message}", "");
        }
        if !self.seen.unanswered.is_empty() {
            println!(
                "{:<9} creates the server did not answer, stored: {} of {}",
                "",
                self.unanswered_stored,
                self.seen.unanswered.len()
            );
        }
        let calls: u64 = self.seen.codes.values().sum();
        println!(
            "{:<9} log: {} lines, {} bytes for {calls} calls ({:.2} lines, {:.0} bytes per call)",
            "",
            self.log.0,
            self.log.1,
            self.log.0 as f64 / calls as f64,
            self.log.1 as f64 / calls as f64,
        );
    }

    fn check(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if !self.lost.is_empty() {
            failures.push(format!(
                "{}: {} acknowledged creates lost, e.g. {:?}",
                self.scenario,
                self.lost.len(),
                &self.lost[..self.lost.len().min(5)]
            ));
        }
        // What the server answers; and after SIGTERM, whatever the client
        // library makes of a call its closing connection never sent.
        let allowed = ["OK", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"];
        let other: Vec<_> = self
            .seen
            .codes
            .keys()
            .filter(|code| !allowed.contains(&code.as_str()) && !code.ends_with("(client)"))
            .collect();
        if self.unanswered_stored > 0 {
            failures.push(format!(
                "{}: {} creates the server did not answer were stored",
                self.scenario, self.unanswered_stored
            ));
        }
        if self.seen.client_made_early > 0 {
            failures.push(format!(
                "{}: {} calls got no answer from the server before SIGTERM",
                self.scenario, self.seen.client_made_early
            ));
        }
        if !other.is_empty() {
            failures.push(format!(
                "{}: codes other than {allowed:?}: {other:?}",
                self.scenario
            ));
        }
        failures
    }
}

/// The service binary, with a short grace and a quick readiness probe.
async fn start(database: Database, data_dir: Option<std::path::PathBuf>) -> ServiceProcess {
    ServiceProcess::start(Start {
        database,
        data_dir,
        args: ["--shutdown-grace", "2s", "--health-interval", "200ms"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await
}

/// The service on its own Postgres, whose postmaster is killed.
async fn embedded() -> Report {
    let data_dir = helpers::scratch_dir("faults-embedded");
    let mut service = start(Database::Embedded, Some(data_dir.clone())).await;
    let load = Load::start(&service, "embedded");
    progress(&load, 200, Instant::now()).await;
    let mut recoveries = Vec::new();
    for _ in 0..rounds() {
        let killed = Instant::now();
        helpers::kill_postmaster(&data_dir);
        readiness_becomes(&service, ServingStatus::NotServing, killed).await;
        recoveries.push(readiness_becomes(&service, ServingStatus::Serving, killed).await);
        progress(&load, 200, killed).await;
    }
    let drain = terminate(&mut service, &load).await;
    let seen = load.finish().await;
    let log = log_size(&service);

    // The service stopped its Postgres; start it again to look.
    let cluster = Cluster::start_or_attach(&data_dir, Default::default(), Sharing::Attach)
        .await
        .expect("the embedded cluster starts");
    let (lost, unanswered_stored) = look(&cluster.config(EMBEDDED_DATABASE), &seen).await;
    cluster.close().await.unwrap();
    Report {
        scenario: "embedded",
        since: "the kill",
        recoveries,
        drain,
        seen,
        lost,
        unanswered_stored,
        log,
    }
}

/// The service on a Postgres of this test's, which is restarted.
async fn external() -> Report {
    let pg_dir = helpers::scratch_dir("faults-external");
    let mut cluster = helpers::start_embedded(&pg_dir, false).await;
    let url = format!(
        "host={} user=postgres dbname=faults",
        cluster.socket_dir().display()
    );
    let db = cluster.config("faults");
    let mut service = start(Database::Url(url), None).await;
    let load = Load::start(&service, "external");
    progress(&load, 200, Instant::now()).await;
    let mut recoveries = Vec::new();
    for round in 0..rounds() {
        let back = if round % 2 == 0 {
            // A clean restart, down for a second.
            let stopped = Instant::now();
            cluster.stop().await.unwrap();
            readiness_becomes(&service, ServingStatus::NotServing, stopped).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster = helpers::start_embedded(&pg_dir, false).await;
            Instant::now()
        } else {
            // A crash, after which this test's supervisor starts it again
            // (crash recovery included); the time counts from when it
            // answers again.
            let killed = Instant::now();
            let pid = helpers::kill_postmaster(&pg_dir);
            loop {
                let restarted = std::fs::read_to_string(pg_dir.join("pgdata/postmaster.pid"))
                    .is_ok_and(|file| !file.starts_with(&format!("{pid}\n")));
                if restarted && db.connect(tokio_postgres::NoTls).await.is_ok() {
                    break;
                }
                assert!(
                    killed.elapsed() < RECOVERY_LIMIT,
                    "postgres did not restart"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Instant::now()
        };
        recoveries.push(readiness_becomes(&service, ServingStatus::Serving, back).await);
        progress(&load, 200, back).await;
    }
    let drain = terminate(&mut service, &load).await;
    let seen = load.finish().await;
    let log = log_size(&service);
    let (lost, unanswered_stored) = look(&db, &seen).await;
    cluster.stop().await.unwrap();
    Report {
        scenario: "external",
        since: "postgres answering",
        recoveries,
        drain,
        seen,
        lost,
        unanswered_stored,
        log,
    }
}

#[tokio::main]
async fn main() {
    let started = Instant::now();
    let cases = std::env::var("FAULT_CASES").unwrap_or_else(|_| "embedded,external".into());
    let mut reports = Vec::new();
    if cases.contains("embedded") {
        reports.push(embedded().await);
    }
    if cases.contains("external") {
        reports.push(external().await);
    }
    println!(
        "faults: {} rounds each, {:.0} s",
        rounds(),
        started.elapsed().as_secs_f64()
    );
    for report in &reports {
        report.print();
    }
    let failures: Vec<String> = reports.iter().flat_map(Report::check).collect();
    assert!(failures.is_empty(), "{failures:#?}");
}
