//! Distributed traces: the service binary exports its spans over OTLP/gRPC
//! to a collector of the test's own, continuing the callers' W3C trace
//! context, with no personal data in any span.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};
use tonic::{Code, Request, Response, Status};
use users_service::pb::v1::{CreateUserRequest, GetUserRequest, ListUsersRequest};

use crate::helpers::Bearer;
use crate::process::{ServiceProcess, Start};
use crate::users::user;

/// An OTLP collector that keeps what it receives.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a free port; its address.
    async fn start(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        addr
    }

    fn spans(&self) -> Vec<Span> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|request| &request.resource_spans)
            .flat_map(|resource| &resource.scope_spans)
            .flat_map(|scope| scope.spans.clone())
            .collect()
    }

    fn resource_attributes(&self) -> Vec<KeyValue> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|request| &request.resource_spans)
            .filter_map(|resource| resource.resource.clone())
            .flat_map(|resource| resource.attributes)
            .collect()
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value: &AnyValue| value.value.as_ref())
}

fn string(attributes: &[KeyValue], key: &str) -> String {
    match attribute(attributes, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!("{key} is {other:?}"),
    }
}

fn int(attributes: &[KeyValue], key: &str) -> i64 {
    match attribute(attributes, key) {
        Some(Value::IntValue(n)) => *n,
        other => panic!("{key} is {other:?}"),
    }
}

/// The caller's trace: a trace id and the caller's span id, as W3C
/// `traceparent` carries them.
struct CallerSpan {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

impl CallerSpan {
    fn new() -> Self {
        Self {
            trace_id: rand::random(),
            span_id: rand::random(),
        }
    }

    fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-01",
            hex::encode(self.trace_id),
            hex::encode(self.span_id)
        )
    }

    fn on<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("traceparent", self.traceparent().parse().unwrap());
        request
            .metadata_mut()
            .insert("tracestate", "acme=t61rcWkgMzE".parse().unwrap());
        request
    }
}

/// The server span of the call made in `caller`'s trace.
fn server_span<'a>(spans: &'a [Span], caller: &CallerSpan) -> &'a Span {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == caller.trace_id && s.parent_span_id == caller.span_id)
        .collect();
    assert_eq!(found.len(), 1, "{spans:#?}");
    found[0]
}

#[tokio::test]
async fn calls_are_exported_as_spans_of_their_callers_traces_without_personal_data() {
    let collector = Collector::default();
    let collector_addr = collector.start().await;
    let mut process = ServiceProcess::start(Start {
        args: vec!["--otlp-endpoint".into(), format!("http://{collector_addr}")],
        ..Default::default()
    })
    .await;
    let channel = process.channel().await;
    let mut users =
        users_service::pb::v1::users_service_client::UsersServiceClient::with_interceptor(
            channel.clone(),
            Bearer::new(Some(&process.admin_token)),
        );

    let email = "ada.lovelace@trace.example";
    let create = CallerSpan::new();
    let mut new_user = user("trace-ref-1", email);
    new_user.first_name = "Augusta".into();
    let created = users
        .create_user(create.on(CreateUserRequest {
            user: Some(new_user),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let get = CallerSpan::new();
    users
        .get_user(get.on(GetUserRequest {
            id: created.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let list = CallerSpan::new();
    users
        .list_users(list.on(ListUsersRequest::default()))
        .await
        .unwrap();
    let refused = CallerSpan::new();
    let mut anonymous =
        users_service::pb::v1::users_service_client::UsersServiceClient::new(channel);
    let status = anonymous
        .get_user(refused.on(GetUserRequest {
            id: created.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // SIGTERM: what is queued is exported before the process ends.
    let (exit, _) = process.terminate(Duration::from_secs(20)).await;
    assert!(exit.success());
    let spans = collector.spans();

    for (caller, method, code) in [
        (&create, "CreateUser", 0),
        (&get, "GetUser", 0),
        (&list, "ListUsers", 0),
        (&refused, "GetUser", Code::Unauthenticated as i64),
    ] {
        let span = server_span(&spans, caller);
        assert_eq!(span.name, format!("users.v1.UsersService/{method}"));
        assert_eq!(span.kind, SpanKind::Server as i32);
        assert_eq!(span.trace_state, "acme=t61rcWkgMzE");
        assert_eq!(string(&span.attributes, "rpc.system"), "grpc");
        assert_eq!(
            string(&span.attributes, "rpc.service"),
            "users.v1.UsersService"
        );
        assert_eq!(string(&span.attributes, "rpc.method"), method);
        assert_eq!(int(&span.attributes, "rpc.grpc.status_code"), code);
    }

    // The database work is a child of the call; a batch statement (GetUser
    // and CreateUser go to Postgres together with whatever else waits)
    // links to every call it served.
    for caller in [&create, &get, &list] {
        let call = server_span(&spans, caller);
        let database: Vec<_> = spans
            .iter()
            .filter(|s| s.parent_span_id == call.span_id && s.trace_id == call.trace_id)
            .collect();
        assert!(!database.is_empty(), "no database span under {}", call.name);
        for span in &database {
            assert_eq!(span.kind, SpanKind::Client as i32);
            assert_eq!(string(&span.attributes, "db.system.name"), "postgresql");
        }
    }
    let get_call = server_span(&spans, &get);
    let batch = spans
        .iter()
        .find(|s| s.parent_span_id == get_call.span_id && s.name == "get_user")
        .expect("GetUser's lookup is a batch statement");
    assert_eq!(int(&batch.attributes, "db.operation.batch.size"), 1);
    assert!(
        batch
            .links
            .iter()
            .any(|l| l.span_id == get_call.span_id && l.trace_id == get_call.trace_id)
    );

    // A batch says the kind of its statements, which have no span each:
    // GetUser's lookup reads users.
    assert_eq!(string(&batch.attributes, "db.operation.name"), "SELECT");
    assert_eq!(string(&batch.attributes, "db.collection.name"), "users");
    assert!(
        !spans.iter().any(|s| s.parent_span_id == batch.span_id),
        "{spans:#?}"
    );
    // Other work has a span per statement, named by its kind: ListUsers
    // reads users.
    let list_call = server_span(&spans, &list);
    let list_work = spans
        .iter()
        .find(|s| s.parent_span_id == list_call.span_id && s.name == "postgresql")
        .expect("ListUsers' database work");
    let statements: Vec<_> = spans
        .iter()
        .filter(|s| s.parent_span_id == list_work.span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert!(statements.contains(&"SELECT users"), "{statements:?}");

    let resource = collector.resource_attributes();
    assert_eq!(string(&resource, "service.name"), "users-service");
    assert_eq!(
        string(&resource, "service.version"),
        env!("CARGO_PKG_VERSION")
    );

    // Nothing a request carried, nor the token, is in any span.
    let exported = format!("{spans:?}");
    for secret in [
        email,
        "Augusta",
        "trace-ref-1",
        process.admin_token.as_str(),
    ] {
        assert!(!exported.contains(secret), "{secret} is in a span");
    }
}

#[tokio::test]
async fn a_collector_that_never_answers_slows_no_call_and_the_stop_waits_at_most_seconds() {
    // It takes connections and then says nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let mut process = ServiceProcess::start(Start {
        args: vec!["--otlp-endpoint".into(), format!("http://{silent_addr}")],
        ..Default::default()
    })
    .await;
    let mut users = process.users().await;
    let started = std::time::Instant::now();
    for _ in 0..300 {
        let status = users
            .get_user(GetUserRequest {
                id: uuid::Uuid::now_v7().to_string(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "300 calls took {took:?}");
    // The spans still queued get their 5 s at the stop, no more.
    let (exit, stopping) = process.terminate(Duration::from_secs(20)).await;
    assert!(exit.success());
    assert!(
        stopping < Duration::from_secs(10),
        "the stop took {stopping:?}"
    );
    held.abort();
}
