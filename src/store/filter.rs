//! Typed list conditions and keyset cursors, shared by the user and tenant lists.
//!
//! Conditions arrive here already parsed (UUIDs are UUIDs, times are times);
//! this module only turns them into diesel expressions.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A condition of a `StringFilter`, with the ROQ operator names, on a
/// column of values `T`: the comparisons take `T`s, the patterns text.
#[derive(Debug, Clone, PartialEq)]
pub enum StringOp<T> {
    EqualTo(T),
    NotEqualTo(T),
    ValueIn(Vec<T>),
    ValueNotIn(Vec<T>),
    /// SQL LIKE pattern, case-sensitive.
    Like(String),
    /// SQL LIKE pattern, case-insensitive.
    ILike(String),
}

/// A condition on a text column.
pub type TextOp = StringOp<String>;

/// A condition on a UUID column. Pattern matches apply to its text form.
pub type UuidOp = StringOp<Uuid>;

/// A comparison with a timestamp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimeOp {
    EqualTo(DateTime<Utc>),
    NotEqualTo(DateTime<Utc>),
    LessThan(DateTime<Utc>),
    LessThanEqual(DateTime<Utc>),
    MoreThan(DateTime<Utc>),
    MoreThanEqual(DateTime<Utc>),
}

/// Sort direction of one ordering term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Asc,
    Desc,
}

/// One value of a keyset cursor: the sort key of the last row of a page.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum CursorValue {
    Bool(bool),
    /// A timestamp, as microseconds since the Unix epoch (Postgres precision).
    Micros(i64),
    Text(String),
}

impl CursorValue {
    pub fn time(value: DateTime<Utc>) -> Self {
        Self::Micros(value.timestamp_micros())
    }
}

/// Escapes `%`, `_` and `\` so that `text` matches literally inside a LIKE pattern.
pub fn escape_like(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Builds the boxed boolean expression of a [`TextOp`] on a text column.
macro_rules! text_condition {
    ($column:expr, $op:expr) => {{
        use diesel::{ExpressionMethods, PgTextExpressionMethods, TextExpressionMethods};
        use $crate::store::filter::StringOp;
        let condition: $crate::store::filter::Boxed<_> = match $op.clone() {
            StringOp::EqualTo(v) => Box::new($column.eq(v)),
            StringOp::NotEqualTo(v) => Box::new($column.ne(v)),
            StringOp::ValueIn(v) => Box::new($column.eq_any(v)),
            StringOp::ValueNotIn(v) => Box::new($column.ne_all(v)),
            StringOp::Like(v) => Box::new($column.like(v)),
            StringOp::ILike(v) => Box::new($column.ilike(v)),
        };
        condition
    }};
}

/// Builds the boxed boolean expression of a [`UuidOp`] on a UUID column.
macro_rules! uuid_condition {
    ($column:expr, $op:expr) => {{
        use diesel::{
            ExpressionMethods, PgTextExpressionMethods, TextExpressionMethods, sql_types::Text,
        };
        use $crate::store::filter::StringOp;
        let condition: $crate::store::filter::Boxed<_> = match $op.clone() {
            StringOp::EqualTo(v) => Box::new($column.eq(v)),
            StringOp::NotEqualTo(v) => Box::new($column.ne(v)),
            StringOp::ValueIn(v) => Box::new($column.eq_any(v)),
            StringOp::ValueNotIn(v) => Box::new($column.ne_all(v)),
            StringOp::Like(v) => Box::new($column.cast::<Text>().like(v)),
            StringOp::ILike(v) => Box::new($column.cast::<Text>().ilike(v)),
        };
        condition
    }};
}

/// Builds the boxed boolean expression of a [`TimeOp`] on a timestamp column.
macro_rules! time_condition {
    ($column:expr, $op:expr) => {{
        use diesel::ExpressionMethods;
        use $crate::store::filter::TimeOp;
        let condition: $crate::store::filter::Boxed<_> = match $op {
            TimeOp::EqualTo(v) => Box::new($column.eq(v)),
            TimeOp::NotEqualTo(v) => Box::new($column.ne(v)),
            TimeOp::LessThan(v) => Box::new($column.lt(v)),
            TimeOp::LessThanEqual(v) => Box::new($column.le(v)),
            TimeOp::MoreThan(v) => Box::new($column.gt(v)),
            TimeOp::MoreThanEqual(v) => Box::new($column.ge(v)),
        };
        condition
    }};
}

pub(crate) use {text_condition, time_condition, uuid_condition};

/// A boolean condition on the rows of table `T`, boxed so that conditions of
/// different shapes can be combined at run time.
pub type Boxed<T> =
    Box<dyn diesel::BoxableExpression<T, diesel::pg::Pg, SqlType = diesel::sql_types::Bool>>;
