//! Fuzzing every RPC of the real server, on a real Postgres.
//!
//! Random requests, built from the values an attacker or a careless client
//! sends (see `strategies.rs`), some of them broken on the wire, and the
//! ids and page tokens the server handed out, go one at a time to the
//! service binary. The run fails on any INTERNAL, UNKNOWN or DATA_LOSS
//! answer, any call slower than [`SLOW`] while the server has nothing else
//! to do, any panic or ERROR line in the server's log, and memory that grows
//! by more than [`RSS_GROWTH`] once warm.
//!
//! `FUZZ_SECONDS` sets the budget (15 s by default; CI runs 60 s, run
//! longer on demand); `FUZZ_SEED` replays a run (each run prints its seed).

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "../api/process.rs"]
mod process;
mod strategies;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use proptest::{
    strategy::{Strategy, ValueTree},
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use tonic::{Code, transport::Channel};
use users_service::pb::v1 as pb;

use helpers::{RawCodec, raw_call};
use process::{ServiceProcess, Start};
use strategies::Call;

/// A call slower than this, with nothing else running, is a finding.
const SLOW: Duration = Duration::from_secs(3);
/// Most the server's resident memory may grow between the end of the
/// warm-up and the end of the run.
const RSS_GROWTH: u64 = 48 * 1024 * 1024;

fn budget() -> Duration {
    let seconds = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    Duration::from_secs(seconds)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// What the server gave out, to be sent back.
#[derive(Default)]
struct Harvest {
    ids: Vec<String>,
    tokens: Vec<String>,
}

impl Harvest {
    fn keep(list: &mut Vec<String>, value: String) {
        if !value.is_empty() {
            if list.len() >= 500 {
                list.swap_remove(0);
            }
            list.push(value);
        }
    }

    fn learn(&mut self, call: &Call, response: &[u8]) {
        match call {
            Call::CreateUser(_) => {
                if let Ok(r) = pb::CreateUserResponse::decode(response) {
                    Self::keep(&mut self.ids, r.user.unwrap_or_default().id);
                }
            }
            Call::ListUsers(_) => {
                if let Ok(r) = pb::ListUsersResponse::decode(response) {
                    for user in r.data.into_iter().take(3) {
                        Self::keep(&mut self.ids, user.id);
                    }
                    Self::keep(&mut self.tokens, r.next_page_token);
                }
            }
            Call::BatchUpsertUsers(_) => {
                if let Ok(r) = pb::BatchUpsertUsersResponse::decode(response) {
                    for result in r.results.into_iter().take(3) {
                        if let Some(pb::batch_upsert_users_result::Outcome::User(user)) =
                            result.outcome
                        {
                            Self::keep(&mut self.ids, user.id);
                        }
                    }
                }
            }
            Call::CreateTenant(_) => {
                if let Ok(r) = pb::CreateTenantResponse::decode(response) {
                    Self::keep(&mut self.ids, r.tenant.unwrap_or_default().id);
                }
            }
            Call::ListTenants(_) => {
                if let Ok(r) = pb::ListTenantsResponse::decode(response) {
                    for tenant in r.data.into_iter().take(2) {
                        Self::keep(&mut self.ids, tenant.id);
                    }
                    Self::keep(&mut self.tokens, r.next_page_token);
                }
            }
            _ => {}
        }
    }

    /// Puts ids and tokens the server made into the call, now and then
    /// slightly broken.
    fn reuse(&self, call: &mut Call, rng: &mut StdRng) {
        for id in call.ids_mut() {
            if rng.random_bool(0.6) {
                if let Some(known) = self.ids.choose(rng) {
                    *id = known.clone();
                }
            }
        }
        if let Some(token) = call.page_token_mut() {
            if rng.random_bool(0.5) {
                if let Some(known) = self.tokens.choose(rng) {
                    *token = known.clone();
                    if rng.random_bool(0.3) && !token.is_empty() {
                        let at = rng.random_range(0..token.len());
                        token.replace_range(at..=at, "A");
                    }
                }
            }
        }
    }
}

/// Breaks a message on the wire, as a buggy client or an attacker would.
fn mangle(bytes: &mut Vec<u8>, rng: &mut StdRng) {
    match rng.random_range(0..5) {
        0 if !bytes.is_empty() => {
            let at = rng.random_range(0..bytes.len());
            bytes[at] ^= 1 << rng.random_range(0..8);
        }
        1 => {
            // Bytes that are never UTF-8, wherever they land.
            let at = rng.random_range(0..=bytes.len());
            bytes.splice(at..at, [0xff, 0xfe, 0xc0]);
        }
        2 if !bytes.is_empty() => {
            let at = rng.random_range(0..bytes.len());
            bytes.truncate(at);
        }
        3 => {
            let extra: Vec<u8> = (0..rng.random_range(1..32)).map(|_| rng.random()).collect();
            bytes.extend(extra);
        }
        _ => {
            // An unknown field (number 999, varint), which must be ignored.
            bytes.extend([0xb8, 0x3e, 0x01]);
        }
    }
}

/// A server-streaming call with raw bytes: every message read (or the
/// first `most`: WatchUsers never ends by itself); the status at the end.
async fn raw_stream(
    channel: &Channel,
    token: &str,
    path: &'static str,
    message: Vec<u8>,
    most: usize,
) -> Result<usize, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = grpc
        .server_streaming(
            request,
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?
        .into_inner();
    let mut chunks = 0;
    while chunks < most && stream.message().await?.is_some() {
        chunks += 1;
    }
    Ok(chunks)
}

/// A one-line description of a request for a report (long values cut).
fn describe(call: &Call) -> String {
    let text = format!("{call:?}");
    if text.len() > 400 {
        let start: String = text.chars().take(400).collect();
        format!("{start}... ({} bytes)", text.len())
    } else {
        text
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_never_break_the_server() {
    let budget = budget();
    let seed = seed();
    println!("fuzzing for {budget:?} with FUZZ_SEED={seed}");
    let service = ServiceProcess::start(Start::default()).await;
    let channel = service.channel().await;
    let token = service.admin_token.clone();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &{
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            bytes
        }),
    );
    let strategy = strategies::call();
    let mut harvest = Harvest::default();
    let mut findings = Vec::new();
    let mut codes: BTreeMap<(&'static str, String), u32> = BTreeMap::new();
    let mut slowest = (Duration::ZERO, String::new());

    let started = Instant::now();
    let warm = started + budget / 5;
    let mut rss_warm = None;
    let mut calls = 0u64;
    while started.elapsed() < budget {
        if rss_warm.is_none() && Instant::now() >= warm {
            rss_warm = Some(service.rss());
        }
        let mut call = strategy.new_tree(&mut runner).expect("a request").current();
        harvest.reuse(&mut call, &mut rng);
        let mut bytes = call.encode();
        let mangled = rng.random_bool(0.2);
        if mangled {
            mangle(&mut bytes, &mut rng);
        }
        let credentials = match rng.random_range(0..20) {
            0 => None,
            1 => Some("usk_0123456789abcdef_nope".to_owned()),
            _ => Some(token.clone()),
        };
        let size = bytes.len();
        let began = Instant::now();
        let outcome = match &call {
            Call::ExportUsers(_) | Call::WatchUsers(_) => {
                // A watch: its first message says it started (or its status
                // why not); the stream ends when it is dropped.
                let most = match &call {
                    Call::WatchUsers(_) => 1,
                    _ => usize::MAX,
                };
                raw_stream(
                    &channel,
                    credentials.as_deref().unwrap_or(""),
                    call.path(),
                    bytes,
                    most,
                )
                .await
                .map(|_| Vec::new())
            }
            _ => raw_call(&channel, credentials.as_deref(), call.path(), bytes).await,
        };
        let took = began.elapsed();
        calls += 1;
        let code = outcome
            .as_ref()
            .map_or_else(tonic::Status::code, |_| Code::Ok);
        *codes.entry((call.path(), format!("{code:?}"))).or_default() += 1;
        if took > slowest.0 {
            slowest = (took, describe(&call));
        }
        match &outcome {
            Ok(response) => harvest.learn(&call, response),
            Err(status)
                if matches!(
                    status.code(),
                    Code::Internal | Code::Unknown | Code::DataLoss
                ) =>
            {
                findings.push(format!(
                    "{:?} {:?} (mangled: {mangled}, {} bytes, credentials {:?}) for {}",
                    status.code(),
                    status.message(),
                    size,
                    credentials.as_deref().map(|c| &c[..8.min(c.len())]),
                    describe(&call)
                ));
            }
            Err(_) => {}
        }
        if took > SLOW {
            findings.push(format!("{took:?} for {}", describe(&call)));
        }
    }
    let rss_end = service.rss();

    println!(
        "{calls} calls in {:?}; slowest {:?}: {}",
        started.elapsed(),
        slowest.0,
        slowest.1
    );
    for ((path, code), n) in &codes {
        println!("  {path} {code}: {n}");
    }
    let log = service.log_lines();
    for line in &log {
        let text = line.to_string();
        if text.contains("panicked") || line["level"] == "ERROR" {
            findings.push(format!("log: {text}"));
        }
    }
    if let Some(warm) = rss_warm {
        println!(
            "RSS {} MiB after warm-up, {} MiB at the end",
            warm / (1 << 20),
            rss_end / (1 << 20)
        );
        if rss_end > warm + RSS_GROWTH {
            findings.push(format!("RSS grew from {warm} to {rss_end} bytes"));
        }
    }
    assert!(
        findings.is_empty(),
        "{} findings (FUZZ_SEED={seed}):\n{}",
        findings.len(),
        findings
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
