//! End-user tokens verified with the identity provider's key set (JWKS),
//! served by an HTTP server of the test's own (or read from a file), as it
//! rotates.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, routing::get};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tonic::Code;
use users_service::pb::v1::GetUserRequest;
use uuid::Uuid;

use crate::auth::claims;
use crate::helpers::{TestApp, fixture, fresh_database, server, spawn_with, test_config};

/// The public JWK of each test key, by kid.
fn jwk(kid: &str) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("jwks-keys.json")).unwrap()).unwrap();
    all[kid].clone()
}

fn key_set(kids: &[&str]) -> String {
    json!({ "keys": kids.iter().map(|kid| jwk(kid)).collect::<Vec<_>>() }).to_string()
}

/// A token of a fresh user, signed with the test key `kid`.
fn token(kid: &str) -> String {
    let (algorithm, key) = match kid {
        "rs256-a" => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt-rs256-private.pem")).unwrap()),
        ),
        "rs256-b" => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwks-rs256-b-private.pem")).unwrap()),
        ),
        "es256" => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&std::fs::read(fixture("jwks-es256-private.pem")).unwrap()),
        ),
        other => panic!("no test key {other}"),
    };
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    encode(&header, &claims(&Uuid::now_v7().to_string()), &key.unwrap()).unwrap()
}

/// Whether the server takes `token`: a user may look itself up (and, not
/// existing, finds nothing), or is UNAUTHENTICATED.
async fn accepted(app: &TestApp, token: &str) -> bool {
    let sub = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token)
        .map(|data| data.claims["sub"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    match app
        .users_as(Some(token))
        .get_user(GetUserRequest {
            id: sub,
            ..Default::default()
        })
        .await
    {
        Err(status) if status.code() == Code::NotFound => true,
        Err(status) if status.code() == Code::Unauthenticated => false,
        other => panic!("unexpected answer: {other:?}"),
    }
}

/// Waits up to `within` for `token` to be `accepted` or not.
async fn becomes(app: &TestApp, token: &str, wanted: bool, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while accepted(app, token).await != wanted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the token is still {}",
            if wanted { "refused" } else { "accepted" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the test's identity provider serves, and how often it was asked.
#[derive(Clone, Default)]
struct Provider {
    answer: Arc<Mutex<(StatusCode, String)>>,
    fetches: Arc<AtomicUsize>,
}

impl Provider {
    fn serve(&self, status: StatusCode, body: String) {
        *self.answer.lock().unwrap() = (status, body);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Serves `/jwks.json` on a free port, with `Cache-Control: max-age=1`;
    /// its URL.
    async fn start(&self) -> String {
        async fn jwks(
            State(provider): State<Provider>,
        ) -> (StatusCode, [(&'static str, &'static str); 1], String) {
            provider.fetches.fetch_add(1, Ordering::SeqCst);
            let (status, body) = provider.answer.lock().unwrap().clone();
            (status, [("cache-control", "public, max-age=1")], body)
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/jwks.json", get(jwks))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }
}

async fn spawn_with_jwks(url: Option<String>, file: Option<std::path::PathBuf>) -> TestApp {
    let name = fresh_database().await;
    let mut config = test_config(Some(server().url(&name)));
    config.jwt_key_file = None;
    config.jwt_jwks_url = url;
    config.jwt_jwks_file = file;
    // Far longer than the provider's max-age, which then sets the pace.
    config.jwt_jwks_refresh = Duration::from_secs(60);
    let mut app = spawn_with(config).await;
    app.database = name;
    app
}

#[tokio::test]
async fn tokens_follow_the_providers_key_set_as_it_rotates() {
    let provider = Provider::default();
    provider.serve(StatusCode::OK, key_set(&["rs256-a", "es256"]));
    let url = provider.start().await;
    let app = spawn_with_jwks(Some(url), None).await;

    // RS256 and ES256, each verified with the key its kid names.
    let (a, es) = (token("rs256-a"), token("es256"));
    assert!(accepted(&app, &a).await);
    assert!(accepted(&app, &es).await);

    // A new key: its tokens are taken within a refresh (an unknown kid
    // makes one fetch, at most one a second), and the old key still works
    // while it is in the set.
    provider.serve(StatusCode::OK, key_set(&["rs256-a", "rs256-b"]));
    let b = token("rs256-b");
    becomes(&app, &b, true, Duration::from_secs(3)).await;
    assert!(accepted(&app, &a).await);

    // The old key removed: its tokens are refused within a refresh (the
    // provider's max-age is 1 s).
    provider.serve(StatusCode::OK, key_set(&["rs256-b"]));
    becomes(&app, &a, false, Duration::from_secs(4)).await;
    assert!(accepted(&app, &b).await);

    // The provider fails: the last good set stays.
    provider.serve(StatusCode::INTERNAL_SERVER_ERROR, "down".into());
    let before = provider.fetches();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(provider.fetches() > before, "the set is fetched again");
    assert!(accepted(&app, &b).await);

    // Unknown kids cannot make it fetch in a loop: at most one fetch a
    // second, however many calls.
    provider.serve(StatusCode::OK, key_set(&["rs256-b"]));
    let before = provider.fetches();
    let started = tokio::time::Instant::now();
    for n in 0..40 {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(format!("unknown-{n}"));
        let key =
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwks-rs256-b-private.pem")).unwrap())
                .unwrap();
        let forged = encode(&header, &claims(&Uuid::now_v7().to_string()), &key).unwrap();
        assert!(!accepted(&app, &forged).await);
    }
    let seconds = started.elapsed().as_secs_f64();
    let fetched = provider.fetches() - before;
    assert!(
        fetched as f64 <= seconds.ceil() + 2.0,
        "{fetched} fetches in {seconds:.1} s"
    );

    // A kid of the set with another key's signature, or another algorithm
    // than its key's, is refused.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rs256-b".into());
    let other_key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt-rs256-private.pem")).unwrap())
            .unwrap();
    let wrong_signature =
        encode(&header, &claims(&Uuid::now_v7().to_string()), &other_key).unwrap();
    assert!(!accepted(&app, &wrong_signature).await);
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rs256-b".into());
    let confused = encode(
        &header,
        &claims(&Uuid::now_v7().to_string()),
        &EncodingKey::from_secret(jwk("rs256-b")["n"].as_str().unwrap().as_bytes()),
    )
    .unwrap();
    assert!(!accepted(&app, &confused).await);
}

#[tokio::test]
async fn a_key_set_file_is_read_again_for_a_new_kid() {
    let dir = crate::helpers::scratch_dir("jwks-file");
    let path = dir.join("jwks.json");
    std::fs::write(&path, key_set(&["rs256-a"])).unwrap();
    let app = spawn_with_jwks(None, Some(path.clone())).await;
    assert!(accepted(&app, &token("rs256-a")).await);

    std::fs::write(&path, key_set(&["es256"])).unwrap();
    // One fetch per second at most: the first try may come too soon.
    becomes(&app, &token("es256"), true, Duration::from_secs(3)).await;
}
