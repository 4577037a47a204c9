//! `users-service import` and `export`, run as real processes against a
//! running server.

use tokio::process::Command;

use crate::helpers::{TestApp, scratch_dir, spawn_app};

/// Runs the binary without blocking the test's runtime, which also serves
/// the server it talks to.
async fn run(app: &TestApp, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_users-service"))
        .args(args)
        .args(["--server", &format!("http://{}", app.addr)])
        .env("USERS_SERVICE_TOKEN", &app.admin_token)
        .output()
        .await
        .expect("runs users-service")
}

#[tokio::test]
async fn import_upserts_a_jsonl_file_and_lists_the_rejected_rows() {
    let app = spawn_app().await;
    let dir = scratch_dir("import");
    let file = dir.join("users.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"reference": "a", "email": "a@example.com", "firstName": "Ann", "locale": "en-Us", "customData": {"plan": "pro"}}"#,
            r#"{"reference": "b", "email": "not an email"}"#,
            r#"this is not json"#,
            r#"{"reference": "c", "phone": "+15550001234", "isOptedIn": true}"#,
            "",
        ]
        .join("\n"),
    )
    .unwrap();
    let output = run(&app, &["import", file.to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");

    let rows = app
        .db
        .query(
            "SELECT reference, locale, custom_data->>'plan' FROM users ORDER BY reference",
            &[],
        )
        .await
        .unwrap();
    let stored: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        stored,
        [("a".into(), "en-US".into()), ("c".into(), "en-US".into())]
    );
    assert_eq!(rows[0].get::<_, Option<String>>(2).as_deref(), Some("pro"));

    let rejects = std::fs::read_to_string(dir.join("users.jsonl.rejects.jsonl")).unwrap();
    let rejected: Vec<serde_json::Value> = rejects
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let lines: Vec<u64> = rejected
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 3], "{rejects}");
    assert!(rejected[0].to_string().contains("user.email"), "{rejects}");

    // Importing again updates instead of duplicating.
    let again = run(&app, &["import", file.to_str().unwrap()]).await;
    assert!(again.status.success());
    assert_eq!(app.user_count().await, 2);
}

#[tokio::test]
async fn export_writes_json_lines_that_import_reads_back() {
    let app = spawn_app().await;
    let dir = scratch_dir("export");
    let source = dir.join("in.csv");
    std::fs::write(
        &source,
        "reference,email,firstName,lastName,timezone\nr1,r1@example.com,Ada,L,europe/london\nr2,,Bob,,\n",
    )
    .unwrap();
    let imported = run(&app, &["import", source.to_str().unwrap()]).await;
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert_eq!(app.user_count().await, 2);

    let out = dir.join("out.jsonl");
    let exported = run(&app, &["export", "--output", out.to_str().unwrap()]).await;
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let users: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(users.len(), 2);
    let ada = users.iter().find(|u| u["reference"] == "r1").unwrap();
    assert_eq!(ada["firstName"], "Ada");
    assert_eq!(ada["timezone"], "Europe/London");
}

#[tokio::test]
async fn import_through_a_server_crash_stores_every_row_once_and_rejects_none() {
    use crate::helpers::{drop_database, fresh_database, server};
    use crate::process::{Database, ServiceProcess, Start};

    const ROWS: usize = 40_000;
    let database = fresh_database().await;
    let data_dir = scratch_dir("import-crash");
    let first = ServiceProcess::start(Start {
        database: Database::Named(database.clone()),
        data_dir: Some(data_dir.clone()),
        ..Default::default()
    })
    .await;
    let addr = first.addr;
    let file = data_dir.join("users.jsonl");
    let rows: String = (0..ROWS)
        .map(|i| format!("{{\"reference\": \"r{i}\", \"email\": \"u{i}@example.com\"}}\n"))
        .collect();
    std::fs::write(&file, rows).unwrap();
    // What a crashed run of an older version would have left.
    let rejects = data_dir.join("users.jsonl.rejects.jsonl");
    std::fs::write(&rejects, "{\"line\": 1}\n").unwrap();

    let import = Command::new(env!("CARGO_BIN_EXE_users-service"))
        .args(["import", file.to_str().unwrap()])
        .args(["--server", &format!("http://{addr}")])
        .env("USERS_SERVICE_TOKEN", &first.admin_token)
        .kill_on_drop(true)
        .output();
    let import = tokio::spawn(import);

    let (db, connection) = server()
        .config(&database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let count = async || -> i64 {
        db.query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get(0)
    };
    // Kill the server once the import is under way, mid-batch.
    while count().await < 2_000 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    first.signal(nix::sys::signal::Signal::SIGKILL);
    drop(first);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let _second = ServiceProcess::start(Start {
        listen: Some(addr),
        database: Database::Named(database.clone()),
        data_dir: Some(data_dir.clone()),
        ..Default::default()
    })
    .await;

    let output = import.await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("rejected 0"), "{stderr}");
    assert!(!rejects.exists(), "a clean run leaves no rejects file");
    let row = db
        .query_one("SELECT count(*), count(DISTINCT reference) FROM users", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (ROWS as i64, ROWS as i64)
    );
    drop(db);
    drop_database(&database);
}
