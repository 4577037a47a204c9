//! The `import` and `export` commands: users in bulk, as JSON Lines or CSV
//! with ROQ's field names, through the BatchUpsertUsers and ExportUsers calls
//! of a running server.
//!
//! `import` streams the file: a reader thread parses it into batches of 1000
//! rows, a few batches are in flight at once, and the results are handled in
//! file order, so memory stays constant whatever the file size. A row the
//! server refuses, or that cannot be parsed, goes to the rejects file with its
//! line number and the reason. A batch that fails for the server's state (a
//! broken connection, UNAVAILABLE, a rate limit) is sent again for up to a
//! minute, so a server restart costs a pause, not rows; only a server that
//! stays unreachable (or a refused token) stops the import.

use std::{
    collections::HashMap,
    error::Error as _,
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, Write},
    path::Path,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, metadata::AsciiMetadataValue, transport::Channel};
use tonic_types::{ErrorDetails, RpcStatusExt, StatusExt};

use crate::auth::keys::ADMIN_KEY_FILE;
use crate::code::code_name;
use crate::config::{Config, ExportArgs, FileFormat, ImportArgs, ServerArgs};
use crate::grpc::json;
use crate::pb::v1::{
    self as pb, batch_upsert_users_result::Outcome, users_service_client::UsersServiceClient,
};
use crate::telemetry::with_causes;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Client = UsersServiceClient<Channel>;

/// Users per BatchUpsertUsers call (the most the call takes).
const BATCH_SIZE: usize = 1000;
/// BatchUpsertUsers calls in flight at once.
const IN_FLIGHT: usize = 4;

/// A user as one JSON line or CSV row, with ROQ's field names. `id`,
/// `createdAt` and `updatedAt` are written by `export` and ignored by `import`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub reference: String,
    #[serde(default)]
    pub email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default)]
    pub first_name: String,
    #[serde(default)]
    pub last_name: String,
    #[serde(default)]
    pub locale: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_opted_in: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    #[serde(default)]
    pub tenant_id: String,
    #[serde(
        default,
        deserialize_with = "object_or_json_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub custom_data: Option<Map<String, Value>>,
    #[serde(default)]
    pub avatar_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// customData: a JSON object, or (in CSV) a JSON object written as text.
fn object_or_json_text<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Map<String, Value>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Field {
        Object(Map<String, Value>),
        Text(String),
    }
    match Option::<Field>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Field::Object(map)) => Ok(Some(map)),
        Some(Field::Text(text)) if text.trim().is_empty() => Ok(None),
        Some(Field::Text(text)) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| D::Error::custom(format!("customData must be a JSON object: {e}"))),
    }
}

impl From<UserRecord> for pb::User {
    fn from(record: UserRecord) -> Self {
        Self {
            reference: record.reference,
            email: record.email,
            phone: record.phone,
            first_name: record.first_name,
            last_name: record.last_name,
            locale: record.locale,
            timezone: record.timezone,
            is_opted_in: record.is_opted_in.unwrap_or(false),
            active: record.active,
            tenant_id: record.tenant_id,
            custom_data: record.custom_data.as_ref().map(json::json_to_struct),
            avatar_url: record.avatar_url,
            ..Self::default()
        }
    }
}

impl From<pb::User> for UserRecord {
    fn from(user: pb::User) -> Self {
        let time = |t: Option<prost_types::Timestamp>| {
            let t = t?;
            let time = chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)?;
            Some(time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        };
        Self {
            id: Some(user.id),
            reference: user.reference,
            email: user.email,
            phone: user.phone,
            first_name: user.first_name,
            last_name: user.last_name,
            locale: user.locale,
            timezone: user.timezone,
            is_opted_in: Some(user.is_opted_in),
            active: user.active,
            tenant_id: user.tenant_id,
            // Stored custom data is always a valid object.
            custom_data: user
                .custom_data
                .and_then(|data| json::custom_data(&data).ok())
                .map(|data| {
                    let map = data.into_inner().into_iter();
                    map.map(|(key, value)| (key, whole_numbers(value)))
                        .collect()
                }),
            avatar_url: user.avatar_url,
            created_at: time(user.created_at),
            updated_at: time(user.updated_at),
        }
    }
}

/// `Struct` numbers are all doubles: writes whole ones as integers (`1`,
/// not `1.0`), as they most likely were.
fn whole_numbers(value: Value) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < EXACT => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(whole_numbers).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, value)| (key, whole_numbers(value)))
                .collect(),
        ),
        other => other,
    }
}

/// Why a row was not stored, as written to the rejects file.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Rejection {
    code: String,
    message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    field_violations: Vec<FieldViolation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    metadata: HashMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
struct FieldViolation {
    field: String,
    description: String,
}

impl Rejection {
    fn new(code: Code, message: String, details: &ErrorDetails) -> Self {
        let info = details.error_info();
        Self {
            code: code_name(code).to_owned(),
            message,
            field_violations: details
                .bad_request()
                .map(|bad| {
                    bad.field_violations
                        .iter()
                        .map(|v| FieldViolation {
                            field: v.field.clone(),
                            description: v.description.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            reason: info.map(|info| info.reason.clone()),
            metadata: info.map(|info| info.metadata.clone()).unwrap_or_default(),
        }
    }

    /// A row that could not be parsed here.
    fn unreadable(error: impl std::fmt::Display) -> Self {
        let message = format!("the row cannot be read: {error}");
        Self::new(Code::InvalidArgument, message, &ErrorDetails::new())
    }

    fn from_status(status: &Status) -> Self {
        let details = status.get_error_details();
        Self::new(status.code(), status.message().to_owned(), &details)
    }

    fn from_rpc(status: &tonic_types::Status) -> Self {
        let details = status.get_error_details();
        Self::new(Code::from(status.code), status.message.clone(), &details)
    }
}

/// One row of the file on its way to the server.
struct Item {
    line: u64,
    row: Value,
    /// The user to send; `None` once sent or when the row was unreadable.
    user: Option<pb::User>,
    /// `Ok(created)`, or why it was refused.
    outcome: Option<Result<bool, Rejection>>,
}

struct Batch {
    items: Vec<Item>,
    /// Bytes of the file read up to the end of this batch.
    end: u64,
}

impl Item {
    fn parsed(line: u64, row: Value, user: Result<UserRecord, Rejection>) -> Self {
        match user {
            Ok(user) => Self {
                line,
                row,
                user: Some(user.into()),
                outcome: None,
            },
            Err(rejection) => Self {
                line,
                row,
                user: None,
                outcome: Some(Err(rejection)),
            },
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    read: u64,
    created: u64,
    updated: u64,
    rejected: u64,
}

pub async fn import(config: &Config, args: ImportArgs) -> Result<(), BoxError> {
    let format = match args.format {
        Some(format) => format,
        None => format_of(&args.file)?,
    };
    let file =
        File::open(&args.file).map_err(|e| format!("cannot open {}: {e}", args.file.display()))?;
    let size = file.metadata()?.len();
    let rejects_path = args.rejects.unwrap_or_else(|| {
        let mut path = args.file.clone().into_os_string();
        path.push(".rejects.jsonl");
        path.into()
    });
    // The rejects of this run only: an earlier run's file goes.
    match std::fs::remove_file(&rejects_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", rejects_path.display()).into()),
    }
    let (client, auth) = connect(config, &args.server).await?;

    let (sender, receiver) = mpsc::channel(IN_FLIGHT);
    let reader = tokio::task::spawn_blocking(move || read(file, format, &sender));
    let progress = ProgressBar::new(size).with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
    )?);
    let started = Instant::now();
    let mut totals = Totals::default();
    let mut rejects = None;
    let mut batches = ReceiverStream::new(receiver)
        .map(|batch| upsert(client.clone(), auth.clone(), batch))
        .buffered(IN_FLIGHT);
    while let Some(batch) = batches.next().await {
        let batch = batch.map_err(|status| fatal(&status))?;
        for item in batch.items {
            totals.read += 1;
            match item.outcome {
                Some(Ok(true)) => totals.created += 1,
                Some(Ok(false)) => totals.updated += 1,
                Some(Err(rejection)) => {
                    totals.rejected += 1;
                    if rejects.is_none() {
                        rejects = Some(BufWriter::new(File::create(&rejects_path)?));
                    }
                    let out = rejects.as_mut().expect("opened above");
                    let line = serde_json::json!({
                        "line": item.line, "row": item.row, "error": rejection,
                    });
                    serde_json::to_writer(&mut *out, &line)?;
                    out.write_all(b"\n")?;
                }
                None => unreachable!("every item of a finished batch has an outcome"),
            }
        }
        progress.set_position(batch.end);
        progress.set_message(format!(
            "{} read, {} created, {} updated, {} rejected",
            totals.read, totals.created, totals.updated, totals.rejected
        ));
    }
    drop(batches);
    reader.await??;
    if let Some(mut out) = rejects {
        out.flush()?;
    }
    progress.finish_and_clear();

    let seconds = started.elapsed().as_secs_f64();
    let Totals {
        read,
        created,
        updated,
        rejected,
    } = totals;
    eprintln!(
        "read {read}, created {created}, updated {updated}, rejected {rejected} in {seconds:.1} s ({:.0} users/s)",
        (created + updated) as f64 / seconds.max(1e-9)
    );
    if rejected > 0 {
        eprintln!("rejected rows: {}", rejects_path.display());
    }
    Ok(())
}

pub async fn export(config: &Config, args: ExportArgs) -> Result<(), BoxError> {
    let (mut client, auth) = connect(config, &args.server).await?;
    let filter = args.tenant.map(|tenant| pb::UserFilter {
        tenant_id: Some(pb::StringFilter {
            equal_to: Some(tenant.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let request = pb::ExportUsersRequest {
        filter,
        search: String::new(),
        show_deleted: false,
    };
    let mut stream = client
        .export_users(authorized(request, &auth))
        .await
        .map_err(|status| fatal(&status))?
        .into_inner();
    let out: Box<dyn Write + Send> = match &args.output {
        Some(path) => Box::new(File::create(path)?),
        None => Box::new(io::stdout()),
    };
    let mut out = BufWriter::new(out);
    let mut count = 0u64;
    while let Some(chunk) = stream.message().await.map_err(|status| fatal(&status))? {
        for user in chunk.users {
            serde_json::to_writer(&mut out, &UserRecord::from(user))?;
            out.write_all(b"\n")?;
            count += 1;
        }
    }
    out.flush()?;
    eprintln!("exported {count} users");
    Ok(())
}

fn format_of(path: &Path) -> Result<FileFormat, BoxError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson") => Ok(FileFormat::Jsonl),
        Some("csv") => Ok(FileFormat::Csv),
        _ => Err(format!(
            "cannot tell the format of {} from its extension: pass --format jsonl or --format csv",
            path.display()
        )
        .into()),
    }
}

/// Connects to the server and prepares the `authorization` header.
async fn connect(
    config: &Config,
    server: &ServerArgs,
) -> Result<(Client, AsciiMetadataValue), BoxError> {
    let token = match &server.token {
        Some(token) => token.clone(),
        None => {
            let path = config.data_dir.join(ADMIN_KEY_FILE);
            std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "no --token or USERS_SERVICE_TOKEN, and {} cannot be read: {e}",
                    path.display()
                )
            })?
        }
    };
    let auth = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| "the token is not valid in a header")?;
    let url = server
        .server
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.listen));
    let channel = Channel::from_shared(url.clone())?
        .connect()
        .await
        .map_err(|e| format!("cannot reach the server at {url}: {}", with_causes(&e)))?;
    Ok((UsersServiceClient::new(channel), auth))
}

fn authorized<T>(message: T, auth: &AsciiMetadataValue) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", auth.clone());
    request
}

/// How long a batch is tried again while the server cannot answer it
/// (restarting, overloaded, its connection broken).
const RETRY_FOR: Duration = Duration::from_secs(60);

/// Sends the readable rows of a batch and records each row's outcome. A
/// call that fails for the server's state rather than for the rows (the
/// connection broke, UNAVAILABLE, a rate limit) is sent again, with
/// back-off, for up to [`RETRY_FOR`]: BatchUpsertUsers matches rows on their
/// reference, so a batch that was stored before its answer was lost is
/// stored once. Errs when the whole import must stop; a failure that
/// concerns the rows rejects them.
async fn upsert(
    mut client: Client,
    auth: AsciiMetadataValue,
    mut batch: Batch,
) -> Result<Batch, Status> {
    let users: Vec<pb::User> = batch
        .items
        .iter_mut()
        .filter_map(|item| item.user.take())
        .collect();
    if users.is_empty() {
        return Ok(batch);
    }
    let pending = batch.items.iter_mut().filter(|item| item.outcome.is_none());
    let give_up = Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(200);
    let answer = loop {
        // No request id: an upsert matched on reference is idempotent by
        // itself, and a stored response of a thousand users per batch
        // would double what an import writes.
        let request = pb::BatchUpsertUsersRequest {
            users: users.clone(),
            request_id: String::new(),
        };
        match client.batch_upsert_users(authorized(request, &auth)).await {
            Err(status) if is_transient(&status) && Instant::now() < give_up => {
                let wait = status
                    .get_error_details()
                    .retry_info()
                    .and_then(|info| info.retry_delay)
                    .unwrap_or(pause);
                tokio::time::sleep(wait).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(status) if is_transient(&status) => return Err(status),
            answer => break answer,
        }
    };
    match answer {
        Ok(response) => {
            let mut results = response.into_inner().results.into_iter();
            for item in pending {
                item.outcome = Some(match results.next() {
                    Some(pb::BatchUpsertUsersResult {
                        outcome: Some(Outcome::User(_)),
                        created,
                    }) => Ok(created),
                    Some(pb::BatchUpsertUsersResult {
                        outcome: Some(Outcome::Error(status)),
                        ..
                    }) => Err(Rejection::from_rpc(&status)),
                    _ => Err(Rejection::new(
                        Code::Internal,
                        "the server returned no result for this row".to_owned(),
                        &ErrorDetails::new(),
                    )),
                });
            }
        }
        Err(status) if is_fatal(&status) => return Err(status),
        Err(status) => {
            let rejection = Rejection::from_status(&status);
            for item in pending {
                item.outcome = Some(Err(rejection.clone()));
            }
        }
    }
    Ok(batch)
}

/// Failures that no later call would escape (a server that stayed
/// unreachable has already been given up on in the retry loop).
fn is_fatal(status: &Status) -> bool {
    matches!(status.code(), Code::Unauthenticated | Code::Unimplemented)
}

/// Failures of the server's state, not of the rows: worth sending again.
fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Cancelled => {
            true
        }
        // How a client reports a connection that broke under the call.
        Code::Unknown | Code::Internal => {
            status.source().is_some() || status.message().contains("transport error")
        }
        _ => false,
    }
}

fn fatal(status: &Status) -> BoxError {
    let code = code_name(status.code());
    format!("the server refused: {code}: {}", status.message()).into()
}

/// Parses the file into batches and sends them; stops early when the
/// receiver is gone (the import stopped).
fn read(file: File, format: FileFormat, sender: &mpsc::Sender<Batch>) -> io::Result<()> {
    let mut items = Vec::with_capacity(BATCH_SIZE);
    let send = |items: &mut Vec<Item>, end: u64| {
        let items = std::mem::replace(items, Vec::with_capacity(BATCH_SIZE));
        sender.blocking_send(Batch { items, end }).is_ok()
    };
    match format {
        FileFormat::Jsonl => {
            let mut reader = BufReader::new(file);
            let (mut text, mut line, mut end) = (String::new(), 0, 0);
            loop {
                text.clear();
                let n = reader.read_line(&mut text)?;
                if n == 0 {
                    break;
                }
                (line, end) = (line + 1, end + n as u64);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                items.push(match serde_json::from_str::<Value>(text) {
                    Ok(row) => {
                        let user = UserRecord::deserialize(&row).map_err(Rejection::unreadable);
                        Item::parsed(line, row, user)
                    }
                    Err(e) => Item::parsed(
                        line,
                        Value::String(text.to_owned()),
                        Err(Rejection::unreadable(e)),
                    ),
                });
                if items.len() == BATCH_SIZE && !send(&mut items, end) {
                    return Ok(());
                }
            }
            if !items.is_empty() {
                send(&mut items, end);
            }
        }
        FileFormat::Csv => {
            let mut reader = csv::Reader::from_reader(file);
            let headers = reader.headers().map_err(io::Error::other)?.clone();
            let mut record = csv::StringRecord::new();
            loop {
                let line = reader.position().line();
                match reader.read_record(&mut record) {
                    Ok(false) => break,
                    Ok(true) => {
                        let row = headers
                            .iter()
                            .zip(record.iter())
                            .map(|(name, value)| (name.to_owned(), Value::from(value)))
                            .collect();
                        let user = record
                            .deserialize(Some(&headers))
                            .map_err(Rejection::unreadable);
                        let line = record.position().map_or(line, |p| p.line());
                        items.push(Item::parsed(line, Value::Object(row), user));
                    }
                    Err(e) if matches!(e.kind(), csv::ErrorKind::Io(_)) => {
                        return Err(io::Error::other(e));
                    }
                    Err(e) => {
                        let line = e.position().map_or(line, |p| p.line());
                        items.push(Item::parsed(
                            line,
                            Value::Null,
                            Err(Rejection::unreadable(e)),
                        ));
                    }
                }
                if items.len() == BATCH_SIZE && !send(&mut items, reader.position().byte()) {
                    return Ok(());
                }
            }
            if !items.is_empty() {
                send(&mut items, reader.position().byte());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_take_custom_data_as_json_text() {
        let data = "reference,email,isOptedIn,active,customData\nr1,a@example.com,true,,\"{\"\"plan\"\":\"\"pro\"\"}\"\n";
        let mut reader = csv::Reader::from_reader(data.as_bytes());
        let record: UserRecord = reader.deserialize().next().unwrap().unwrap();
        assert_eq!(record.reference, "r1");
        assert_eq!(record.is_opted_in, Some(true));
        assert_eq!(record.active, None);
        assert_eq!(record.custom_data.unwrap()["plan"], "pro");
    }

    #[test]
    fn json_rows_take_custom_data_as_an_object() {
        let record: UserRecord =
            serde_json::from_str(r#"{"reference":"r1","customData":{"a":1},"id":"x"}"#).unwrap();
        assert_eq!(record.custom_data.unwrap()["a"], 1);
        assert_eq!(pb::User::from(UserRecord::default()).id, "");
    }

    #[test]
    fn exported_whole_numbers_are_integers() {
        let value = serde_json::json!({"a": 1.0, "b": [2.5, 3.0], "c": {"d": -4.0}});
        let expected = serde_json::json!({"a": 1, "b": [2.5, 3], "c": {"d": -4}});
        assert_eq!(whole_numbers(value), expected);
    }
}
