//! TLS and mutual TLS on the gRPC port, with certificates of CAs the test
//! makes: who may connect, keys bound to a client certificate, the
//! plaintext health port, and certificate rotation without a restart.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use users_service::pb::v1::{
    CreateKeyRequest, GetUserRequest, KeyRole, keys_service_client::KeysServiceClient,
    users_service_client::UsersServiceClient,
};

use crate::helpers::{
    Bearer, TestApp, fresh_database, scrape, scratch_dir, server, spawn_tls, test_config,
    violated_fields,
};
use crate::metrics::sample;

/// A certificate authority of the test's own.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The server's certificate, for `localhost`.
    fn server(&self) -> Leaf {
        self.leaf(
            "users-service",
            &["localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client's certificate whose common name is `name`.
    fn client(&self, name: &str) -> Leaf {
        self.leaf(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, name: &str, dns: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `contents` to `path` as cert-manager and the kubelet do: whole,
/// by a rename, so the server never reads half a file.
fn replace(path: &Path, contents: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// The server's TLS files in a fresh directory.
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl TlsFiles {
    fn write(server: &Leaf, client_ca: Option<&Ca>) -> Self {
        let dir = scratch_dir("tls");
        std::fs::create_dir_all(&dir).unwrap();
        let files = Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: dir.join("client-ca.crt"),
        };
        files.install(server);
        if let Some(ca) = client_ca {
            replace(&files.client_ca, &ca.pem());
        }
        files
    }

    fn install(&self, server: &Leaf) {
        replace(&self.key, &server.key);
        replace(&self.cert, &server.cert);
    }
}

/// A client that trusts `ca` and presents `identity`, if any.
fn client_tls(ca: &Ca, identity: Option<&Leaf>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(ca.pem()));
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    tls
}

/// A new connection to `app` with `tls`; its error when there is none.
async fn connect(app: &TestApp, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// What a GetUser of a user that does not exist answers with `token` on
/// `channel`: NOT_FOUND once the caller is known, or how the call failed.
async fn get_user_code(channel: Channel, token: &str) -> Code {
    let mut users = UsersServiceClient::with_interceptor(channel, Bearer::new(Some(token)));
    match users
        .get_user(GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// What a call on a new connection with `tls` answers; UNAVAILABLE when the
/// connection cannot be made.
async fn code_with(app: &TestApp, tls: ClientTlsConfig, token: &str) -> Code {
    match connect(app, tls).await {
        Ok(channel) => get_user_code(channel, token).await,
        Err(_) => Code::Unavailable,
    }
}

/// Whether a call failed for want of a connection (it never reached the
/// service, which would have answered NOT_FOUND or UNAUTHENTICATED).
fn refused(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown)
}

async fn spawn_mutual(server_ca: &Ca, client_ca: &Ca, client: &Leaf) -> TestApp {
    let files = TlsFiles::write(&server_ca.server(), Some(client_ca));
    let mut config = test_config(Some(server().url(&fresh_database().await)));
    config.tls_cert = Some(files.cert);
    config.tls_key = Some(files.key);
    config.tls_client_ca = Some(files.client_ca);
    config.health_listen = Some("127.0.0.1:0".parse().unwrap());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    spawn_tls(config, client_tls(server_ca, Some(client))).await
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_of_its_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let billing = client_ca.client("billing");
    let app = spawn_mutual(&server_ca, &client_ca, &billing).await;
    let token = app.admin_token.clone();

    // A client with a certificate of the CA: the call goes through.
    assert_eq!(
        get_user_code(app.channel.clone(), &token).await,
        Code::NotFound
    );
    // None, or one of another CA: the connection is closed in the
    // handshake (with TLS 1.3 the client learns it at its first call),
    // whatever the token.
    let without = code_with(&app, client_tls(&server_ca, None), &token).await;
    assert!(refused(without), "{without:?}");
    let intruder = Ca::new("intruder CA").client("billing");
    let other_ca = code_with(&app, client_tls(&server_ca, Some(&intruder)), &token).await;
    assert!(refused(other_ca), "{other_ca:?}");
    // Plaintext gets nowhere either.
    let plaintext = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    let plaintext_code = match plaintext {
        Ok(channel) => get_user_code(channel, &token).await,
        Err(_) => Code::Unavailable,
    };
    assert!(refused(plaintext_code), "{plaintext_code:?}");

    // Probes without a certificate use the plaintext health port, which
    // answers health and nothing else.
    let health_addr = app.health_addr.expect("the health port is on");
    let probe = Channel::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(probe.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    assert_eq!(get_user_code(probe, &token).await, Code::Unimplemented);

    let metrics = scrape(app.metrics_addr.unwrap()).await;
    let failures = sample(&metrics, "users_service_tls_handshake_failures_total", &[]).unwrap();
    assert!(failures >= 2.0, "{failures} handshake failures counted");
    let expiry = sample(
        &metrics,
        "users_service_tls_certificate_expiry_timestamp_seconds",
        &[],
    )
    .unwrap();
    assert!(expiry > chrono::Utc::now().timestamp() as f64);
    app.shutdown().await;
}

#[tokio::test]
async fn a_key_bound_to_a_client_certificate_works_only_from_it() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let billing = client_ca.client("billing");
    let reports = client_ca.client("reports");
    let app = spawn_mutual(&server_ca, &client_ca, &billing).await;

    let mut keys = KeysServiceClient::with_interceptor(
        app.channel.clone(),
        Bearer::new(Some(&app.admin_token)),
    );
    let created = keys
        .create_key(CreateKeyRequest {
            name: "billing job".into(),
            role: KeyRole::Admin as i32,
            client_name: "billing".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.key.unwrap();
    assert_eq!(key.client_name, "billing");
    let row = app
        .db
        .query_one("SELECT client_name FROM api_keys WHERE id = $1", &[&key.id])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("billing"));

    let token = created.token;
    let from_billing = connect(&app, client_tls(&server_ca, Some(&billing)))
        .await
        .unwrap();
    let from_reports = connect(&app, client_tls(&server_ca, Some(&reports)))
        .await
        .unwrap();
    assert_eq!(
        get_user_code(from_billing.clone(), &token).await,
        Code::NotFound
    );
    assert_eq!(
        get_user_code(from_reports.clone(), &token).await,
        Code::Unauthenticated
    );
    // A key bound to no certificate works from any.
    assert_eq!(
        get_user_code(from_reports, &app.admin_token).await,
        Code::NotFound
    );

    let refused = keys
        .create_key(CreateKeyRequest {
            name: "too long".into(),
            role: KeyRole::Admin as i32,
            client_name: "x".repeat(256),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&refused), ["client_name"]);
    app.shutdown().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_without_dropping_open_ones() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let files = TlsFiles::write(&old_ca.server(), None);
    let mut config = test_config(Some(server().url(&fresh_database().await)));
    config.tls_cert = Some(files.cert.clone());
    config.tls_key = Some(files.key.clone());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let app = spawn_tls(config, client_tls(&old_ca, None)).await;
    let token = app.admin_token.clone();

    // Calls on a connection made before the rotation, all through it.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let caller = tokio::spawn({
        let (channel, token) = (app.channel.clone(), token.clone());
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if get_user_code(channel.clone(), &token).await != Code::NotFound {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    // Some calls before the rotation, some after, whatever the machine's pace.
    let calls_reach = |n: usize| {
        let calls = calls.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while calls.load(Ordering::Relaxed) < n {
                assert!(tokio::time::Instant::now() < deadline, "the calls stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    calls_reach(10).await;

    // A file that is not a certificate is not used: the old one stays.
    replace(&files.cert, "not a certificate");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = scrape(app.metrics_addr.unwrap()).await;
        let failed = sample(
            &metrics,
            "users_service_tls_reloads_total",
            &[("result", "failed")],
        );
        if failed.is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad file was not tried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        code_with(&app, client_tls(&old_ca, None), &token).await,
        Code::NotFound
    );

    // The new certificate, of another CA, reaches new connections within
    // the check period; the old one is no longer served.
    files.install(&new_ca.server());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while code_with(&app, client_tls(&new_ca, None), &token).await != Code::NotFound {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = code_with(&app, client_tls(&old_ca, None), &token).await;
    assert!(refused(old), "{old:?}");

    calls_reach(calls.load(Ordering::Relaxed) + 10).await;
    stop.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    let calls = calls.load(Ordering::Relaxed);
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {calls} calls");

    let metrics = scrape(app.metrics_addr.unwrap()).await;
    let reloads = |result| {
        sample(
            &metrics,
            "users_service_tls_reloads_total",
            &[("result", result)],
        )
    };
    assert!(reloads("ok").unwrap() >= 1.0);
    assert!(reloads("failed").unwrap() >= 1.0);
    app.shutdown().await;
}

#[tokio::test]
async fn metrics_can_be_served_with_the_grpc_port_s_tls() {
    let ca = Ca::new("server CA");
    let files = TlsFiles::write(&ca.server(), None);
    let mut config = test_config(Some(server().url(&fresh_database().await)));
    config.tls_cert = Some(files.cert);
    config.tls_key = Some(files.key);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.metrics_tls = true;
    let app = spawn_tls(config, client_tls(&ca, None)).await;
    let metrics = app.metrics_addr.unwrap();

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve("localhost", metrics)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/metrics", metrics.port());
    let text = client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("users_service_tls_certificate_expiry_timestamp_seconds"));
    // Not in plaintext.
    let plaintext = reqwest::get(format!("http://{metrics}/metrics")).await;
    assert!(plaintext.is_err(), "{plaintext:?}");
    app.shutdown().await;
}

#[test]
fn check_refuses_unusable_tls_files_and_an_origin_with_a_path() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_users-service"))
            .args(args)
            .arg("check")
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = run(&[
        "--tls-cert",
        "/nonexistent/tls.crt",
        "--tls-key",
        "/nonexistent/tls.key",
    ]);
    assert!(
        missing.contains("cannot read /nonexistent/tls.crt"),
        "{missing}"
    );
    let origin = run(&["--cors-allowed-origin", "https://admin.example/app"]);
    assert!(origin.contains("is not an origin"), "{origin}");
}
