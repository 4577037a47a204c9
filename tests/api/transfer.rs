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
