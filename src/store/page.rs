//! A page of a list, shared by the user and tenant lists.

use super::filter::CursorValue;

/// A page of rows, the number of matches, and the cursor of the next page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub total: Option<i64>,
    /// Present when more rows follow this page.
    pub next: Option<Vec<CursorValue>>,
}

/// A keyset cursor that does not fit the order it is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page token does not match this request")]
pub struct CursorMismatch;
