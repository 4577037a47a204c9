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
