//! `src/store/schema.rs` says what the migrated database holds.

use std::collections::BTreeMap;

use crate::helpers::spawn_app;

/// The `diesel::table!` blocks of schema.rs: table -> (primary key, columns
/// as `name -> Type`).
fn declared() -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    let text = include_str!("../../src/store/schema.rs");
    let mut tables = BTreeMap::new();
    for block in text.split("diesel::table! {").skip(1) {
        let block = &block[..block.find("\n}").expect("a closed block")];
        let mut lines = block.lines().map(str::trim).filter(|l| !l.is_empty());
        let head = lines
            .find(|l| !l.starts_with("use "))
            .expect("a table line");
        let (name, rest) = head.split_once(" (").expect("name (key)");
        let key = rest[..rest.find(')').unwrap()]
            .split(',')
            .map(|c| c.trim().to_owned())
            .collect();
        let columns = lines
            .filter(|l| *l != "}" && !l.starts_with("use ") && !l.starts_with("#["))
            .map(|l| l.trim_end_matches(',').to_owned())
            .collect();
        tables.insert(name.to_owned(), (key, columns));
    }
    tables
}

/// diesel's name for a Postgres type.
fn diesel_type(udt: &str) -> &'static str {
    match udt {
        "uuid" => "Uuid",
        "text" => "Text",
        "bool" => "Bool",
        "timestamptz" => "Timestamptz",
        "jsonb" => "Jsonb",
        "bytea" => "Bytea",
        "int4" => "Int4",
        "int8" => "Int8",
        "_uuid" => "Array<Uuid>",
        "_text" => "Array<Text>",
        "int2" => "Int2",
        "xid8" => "Xid8",
        other => panic!("schema.rs has no mapping for the type {other}"),
    }
}

#[tokio::test]
async fn schema_rs_matches_the_migrated_database() {
    let app = spawn_app().await;
    let tables: Vec<String> = app
        .db
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name NOT LIKE '\\_\\_%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let declared = declared();
    assert_eq!(
        declared.keys().cloned().collect::<Vec<_>>(),
        tables,
        "the tables of schema.rs"
    );
    for table in tables {
        let columns: Vec<String> = app
            .db
            .query(
                "SELECT column_name::text, udt_name::text, is_nullable = 'YES' \
                 FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 \
                 ORDER BY ordinal_position",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| {
                let (name, udt, nullable): (String, String, bool) =
                    (row.get(0), row.get(1), row.get(2));
                let kind = diesel_type(&udt);
                if nullable {
                    format!("{name} -> Nullable<{kind}>")
                } else {
                    format!("{name} -> {kind}")
                }
            })
            .collect();
        let key: Vec<String> = app
            .db
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY k.n",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let (declared_key, declared_columns) = &declared[&table];
        assert_eq!(declared_columns, &columns, "the columns of {table}");
        assert_eq!(declared_key, &key, "the primary key of {table}");
    }
}

/// Migrations from this one on run against tables that hold users in
/// production; the ones before made the schema.
const FIRST_ON_LIVE_TABLES: &str = "2026-12-05-090000";

/// Why `sql` (one migration's up.sql, comments removed) could block writes
/// for long on a large table or break the release before it, by the rules
/// of the README's "Rolling deploys".
fn long_locks(sql: &str, in_transaction: bool) -> Vec<String> {
    let mut found = Vec::new();
    for statement in sql.split(';').map(|s| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_uppercase()
    }) {
        let has = |words: &str| statement.contains(words);
        let rule = if (has("CREATE INDEX") || has("CREATE UNIQUE INDEX") || has("DROP INDEX"))
            && !has("CONCURRENTLY")
        {
            Some("an index is built or dropped without CONCURRENTLY")
        } else if has("CONCURRENTLY") && in_transaction {
            Some("CONCURRENTLY needs run_in_transaction = false in metadata.toml")
        } else if has("ALTER TABLE") && has(" TYPE ") {
            Some("a column's type changes (the table is rewritten)")
        } else if has("SET NOT NULL") {
            Some("SET NOT NULL scans the table under an exclusive lock")
        } else if has("ADD CONSTRAINT") && !has("NOT VALID") && !has("USING INDEX") {
            Some("a constraint is added without NOT VALID (it scans the table under lock)")
        } else if has("ADD COLUMN") && has("NOT NULL") && !has("DEFAULT") {
            Some("a NOT NULL column is added without a default")
        } else if has("DROP COLUMN") || has("RENAME") {
            Some(
                "a column is dropped or renamed that the release before still uses (contract in a later release)",
            )
        } else if has("LOCK TABLE") || has("VACUUM FULL") || has("CLUSTER ") {
            Some("the table is locked for the whole operation")
        } else {
            None
        };
        if let Some(rule) = rule {
            found.push(format!("{rule}: {statement}"));
        }
    }
    found
}

#[test]
fn migrations_on_live_tables_take_no_long_locks() {
    // The checker itself refuses what it must.
    for bad in [
        "CREATE INDEX users_x_idx ON users (email)",
        "ALTER TABLE users ALTER COLUMN email TYPE varchar(500)",
        "ALTER TABLE users ALTER COLUMN locale SET NOT NULL",
        "ALTER TABLE users ADD CONSTRAINT c CHECK (email <> '')",
        "ALTER TABLE users DROP COLUMN reference",
    ] {
        assert!(!long_locks(bad, false).is_empty(), "{bad}");
    }
    assert!(!long_locks("CREATE INDEX CONCURRENTLY i ON users (email)", true).is_empty());
    assert!(long_locks("CREATE INDEX CONCURRENTLY i ON users (email)", false).is_empty());

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut checked = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.as_str() < FIRST_ON_LIVE_TABLES {
            continue;
        }
        let up = std::fs::read_to_string(entry.path().join("up.sql")).unwrap();
        let sql: String = up
            .lines()
            .map(|line| line.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let in_transaction = !std::fs::read_to_string(entry.path().join("metadata.toml"))
            .unwrap_or_default()
            .contains("run_in_transaction = false");
        failures.extend(
            long_locks(&sql, in_transaction)
                .into_iter()
                .map(|f| format!("{name}: {f}")),
        );
        checked += 1;
    }
    assert!(checked > 0, "no migration on live tables was found");
    assert!(failures.is_empty(), "{failures:#?}");
}
