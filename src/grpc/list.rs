//! Parsing of list requests (filters, order, paging) and page tokens.
//!
//! A page token is the keyset cursor of the last row of a page plus a
//! fingerprint of the request it was made for (filters, search, order), so a
//! token replayed with another request is rejected instead of silently
//! returning the wrong rows. It is opaque to clients: base64url of JSON.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, SubsecRound, Utc};
use prost::Message;
use sha2::{Digest, Sha256};

use super::convert::{from_timestamp, uuid};
use crate::domain::{Locale, Phone, TimeZone, Violations};
use crate::error::Error;
use crate::pb::v1 as pb;
use crate::store::filter::{CursorValue, Direction, StringOp, TextOp, TimeOp, UuidOp};
use crate::store::models::Actor;
use crate::store::{tenants, users};

/// Page size when the request does not set one.
pub const DEFAULT_LIMIT: i32 = 20;
/// Largest page a request may ask for.
pub const MAX_LIMIT: i32 = 1000;
/// Largest `offset`: deeper pages are reached with page tokens, whose cost
/// does not grow with the depth.
pub const MAX_OFFSET: i32 = 100_000;
/// Largest `total_count_limit` of ListUsers.
pub const MAX_COUNT_LIMIT: i32 = 100_000;
/// Most ordering terms of ListUsers: one per field users can be ordered by.
pub const MAX_ORDER_TERMS: usize = 10;
/// Longest `search`, in characters.
pub const MAX_SEARCH_CHARS: usize = 100;
/// Longest value compared by a filter (`equal_to`, `not_equal_to`, one item
/// of `value_in` or `value_not_in`), in characters: no stored text is longer.
pub const MAX_FILTER_VALUE_CHARS: usize = 255;
/// Most values in one `value_in` or `value_not_in`.
pub const MAX_FILTER_VALUES: usize = 100;
/// Longest `like` or `i_like` pattern, in characters.
pub const MAX_PATTERN_CHARS: usize = 100;
/// Deepest nesting of user filters (`and`, `or`, `not`), the top-level
/// filter being the first level.
pub const MAX_FILTER_DEPTH: usize = 4;
/// Most conditions in one user filter, nested ones included: one per
/// operator set on a field, one per filter in `and`, `or` or `not`.
pub const MAX_FILTER_CONDITIONS: usize = 64;
/// Longest page token, in bytes; the tokens this service makes are far shorter.
pub const MAX_PAGE_TOKEN_BYTES: usize = 8192;

#[derive(serde::Serialize, serde::Deserialize)]
struct Token {
    /// Fingerprint of the request the token belongs to.
    f: String,
    /// Keyset cursor.
    k: Vec<CursorValue>,
}

fn fingerprint(kind: &str, request: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(kind.as_bytes())
        .chain_update(request)
        .finalize();
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

pub fn encode_token(fingerprint: &str, cursor: Vec<CursorValue>) -> String {
    let token = Token {
        f: fingerprint.to_owned(),
        k: cursor,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("cursor values serialize"))
}

/// The cursor of a page token; `None` without a token, or with a bad one
/// (recorded in `v`).
fn decode_token(v: &mut Violations, token: &str, fingerprint: &str) -> Option<Vec<CursorValue>> {
    if token.is_empty() {
        return None;
    }
    if token.len() > MAX_PAGE_TOKEN_BYTES {
        v.push("page_token", "is not a page token of this service");
        return None;
    }
    let decoded = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Token>(&bytes).ok())
        // Tokens are not signed: a forged one must not carry what a stored
        // value cannot (text Postgres refuses, more values than terms).
        .filter(|token| token.k.len() <= MAX_ORDER_TERMS + 1 && token.k.iter().all(plausible));
    match decoded {
        Some(token) if token.f == fingerprint => Some(token.k),
        Some(_) => {
            v.push(
                "page_token",
                "was made for another filter, search or order; start again without a token",
            );
            None
        }
        None => {
            v.push("page_token", "is not a page token of this service");
            None
        }
    }
}

/// Whether a cursor value could be the sort key of a stored row.
fn plausible(value: &CursorValue) -> bool {
    match value {
        CursorValue::Text(text) => {
            text.chars().count() <= MAX_FILTER_VALUE_CHARS && !text.contains('\0')
        }
        CursorValue::Bool(_) | CursorValue::Micros(_) => true,
    }
}

/// Paging fields shared by the list requests.
struct Paging {
    limit: i64,
    offset: i64,
}

fn paging(v: &mut Violations, limit: Option<i32>, offset: i32, token: &str) -> Paging {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(0..=MAX_LIMIT).contains(&limit) {
        v.push("limit", format!("must be between 0 and {MAX_LIMIT}"));
    }
    if !(0..=MAX_OFFSET).contains(&offset) {
        v.push(
            "offset",
            format!("must be between 0 and {MAX_OFFSET}; page with page_token beyond"),
        );
    }
    if offset > 0 && !token.is_empty() {
        v.push("offset", "cannot be combined with page_token");
    }
    Paging {
        limit: i64::from(limit.clamp(0, MAX_LIMIT)),
        offset: i64::from(offset.clamp(0, MAX_OFFSET)),
    }
}

/// Checks a value a filter compares with; `None` (and a violation) when it
/// is too long or holds a NUL, which no stored text can.
fn filter_value(v: &mut Violations, field: &str, value: &str) -> Option<String> {
    v.check(field, bounded_text(value, MAX_FILTER_VALUE_CHARS))
}

fn bounded_text(value: &str, max: usize) -> Result<String, String> {
    if value.len() > max && value.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if value.contains('\0') {
        return Err("must not contain NUL characters".to_owned());
    }
    Ok(value.to_owned())
}

/// A LIKE pattern: bounded, and well formed (`\` escapes the character
/// after it, so it cannot end the pattern).
fn like_pattern(v: &mut Violations, field: &str, pattern: &str) -> Option<String> {
    let checked = bounded_text(pattern, MAX_PATTERN_CHARS).and_then(|pattern| {
        let mut escaped = false;
        for c in pattern.chars() {
            escaped = !escaped && c == '\\';
        }
        if escaped {
            Err("must not end with an unescaped \\ (write \\\\ for a backslash)".to_owned())
        } else {
            Ok(pattern)
        }
    });
    v.check(field, checked)
}

/// The values of `value_in` or `value_not_in`, each parsed by `one`.
fn value_list<T>(
    v: &mut Violations,
    field: &str,
    values: &[String],
    one: impl Fn(&mut Violations, &str, &str) -> Option<T>,
) -> Option<Vec<T>> {
    if values.len() > MAX_FILTER_VALUES {
        v.push(
            field,
            format!("must have at most {MAX_FILTER_VALUES} values"),
        );
        return None;
    }
    let parsed: Vec<T> = values
        .iter()
        .enumerate()
        .filter_map(|(i, value)| one(v, &format!("{field}[{i}]"), value))
        .collect();
    (parsed.len() == values.len()).then_some(parsed)
}

/// The conditions of a `StringFilter` on `field`, each compared value
/// parsed by `one` (which records its violation).
fn string_ops<T>(
    v: &mut Violations,
    field: &str,
    filter: &pb::StringFilter,
    one: impl Fn(&mut Violations, &str, &str) -> Option<T> + Copy,
) -> Vec<StringOp<T>> {
    let path = |name: &str| format!("{field}.{name}");
    let mut ops = Vec::new();
    if let Some(value) = &filter.equal_to {
        ops.extend(one(v, &path("equal_to"), value).map(StringOp::EqualTo));
    }
    if let Some(value) = &filter.not_equal_to {
        ops.extend(one(v, &path("not_equal_to"), value).map(StringOp::NotEqualTo));
    }
    if !filter.value_in.is_empty() {
        ops.extend(value_list(v, &path("value_in"), &filter.value_in, one).map(StringOp::ValueIn));
    }
    if !filter.value_not_in.is_empty() {
        ops.extend(
            value_list(v, &path("value_not_in"), &filter.value_not_in, one)
                .map(StringOp::ValueNotIn),
        );
    }
    if let Some(pattern) = &filter.like {
        ops.extend(like_pattern(v, &path("like"), pattern).map(StringOp::Like));
    }
    if let Some(pattern) = &filter.i_like {
        ops.extend(like_pattern(v, &path("i_like"), pattern).map(StringOp::ILike));
    }
    ops
}

fn text_ops(v: &mut Violations, field: &str, filter: &pb::StringFilter) -> Vec<TextOp> {
    string_ops(v, field, filter, filter_value)
}

/// Equality operators of a UUID field need UUIDs; patterns stay text.
fn uuid_ops(v: &mut Violations, field: &str, filter: &pb::StringFilter) -> Vec<UuidOp> {
    string_ops(v, field, filter, |v, field, value| {
        v.check(field, uuid(value))
    })
}

/// The six comparisons of a timestamp filter.
#[derive(Debug, Clone, Copy)]
enum Comparison {
    EqualTo,
    NotEqualTo,
    LessThan,
    LessThanEqual,
    MoreThan,
    MoreThanEqual,
}

fn time_ops(v: &mut Violations, field: &str, filter: &pb::TimestampFilter) -> Vec<TimeOp> {
    let bounds = [
        ("equal_to", &filter.equal_to, Comparison::EqualTo),
        ("not_equal_to", &filter.not_equal_to, Comparison::NotEqualTo),
        ("less_than", &filter.less_than, Comparison::LessThan),
        (
            "less_than_equal",
            &filter.less_than_equal,
            Comparison::LessThanEqual,
        ),
        ("more_than", &filter.more_than, Comparison::MoreThan),
        (
            "more_than_equal",
            &filter.more_than_equal,
            Comparison::MoreThanEqual,
        ),
    ];
    let mut ops = Vec::new();
    for (name, value, comparison) in bounds {
        let Some(value) = value else { continue };
        let Some(time) = v.check(&format!("{field}.{name}"), from_timestamp(value)) else {
            continue;
        };
        ops.extend(exact_time_ops(comparison, time));
    }
    ops
}

/// Stored times have microsecond precision, and a finer bound would be cut
/// to whole microseconds on its way to Postgres; these are the conditions on
/// whole microseconds that match exactly what the bound means.
fn exact_time_ops(comparison: Comparison, time: DateTime<Utc>) -> Vec<TimeOp> {
    let floor = time.trunc_subsecs(6);
    let exact = floor == time;
    let ceil = if exact {
        floor
    } else {
        floor + chrono::TimeDelta::microseconds(1)
    };
    match comparison {
        Comparison::EqualTo if exact => vec![TimeOp::EqualTo(time)],
        // Nothing stored lies strictly between two whole microseconds.
        Comparison::EqualTo => vec![TimeOp::MoreThanEqual(ceil), TimeOp::LessThanEqual(floor)],
        Comparison::NotEqualTo if exact => vec![TimeOp::NotEqualTo(time)],
        Comparison::NotEqualTo => Vec::new(),
        Comparison::LessThan => vec![TimeOp::LessThan(ceil)],
        Comparison::LessThanEqual => vec![TimeOp::LessThanEqual(floor)],
        Comparison::MoreThan => vec![TimeOp::MoreThan(floor)],
        Comparison::MoreThanEqual => vec![TimeOp::MoreThanEqual(ceil)],
    }
}

fn bool_conditions(filter: &pb::BoolFilter) -> Vec<bool> {
    filter
        .equal_to
        .into_iter()
        .chain(filter.not_equal_to.map(|value| !value))
        .collect()
}

/// The conditions of a ListUsers (or ExportUsers) filter, ANDed; none, and
/// a violation, when the filter is beyond [`MAX_FILTER_DEPTH`] or
/// [`MAX_FILTER_CONDITIONS`], which is checked before anything is parsed.
fn user_conditions(v: &mut Violations, filter: &pb::UserFilter) -> Vec<users::Condition> {
    match filter_size(filter, 1) {
        Ok(size) if size <= MAX_FILTER_CONDITIONS => filter_conditions(v, "filter", filter),
        Ok(_) | Err(Beyond::Conditions) => {
            v.push(
                "filter",
                format!("must have at most {MAX_FILTER_CONDITIONS} conditions in all"),
            );
            Vec::new()
        }
        Err(Beyond::Depth) => {
            v.push(
                "filter",
                format!("must nest at most {MAX_FILTER_DEPTH} levels of filters"),
            );
            Vec::new()
        }
    }
}

/// Which limit [`filter_size`] stopped counting at.
enum Beyond {
    /// A filter is nested deeper than [`MAX_FILTER_DEPTH`].
    Depth,
    /// The count passed [`MAX_FILTER_CONDITIONS`].
    Conditions,
}

/// The number of conditions of `filter` (at nesting level `depth`, the top
/// level being 1): one per operator set on a field, one per nested filter.
/// Stops as soon as a limit is passed, so its work is bounded by the limits
/// rather than by the request.
fn filter_size(filter: &pb::UserFilter, depth: usize) -> Result<usize, Beyond> {
    fn string(f: &Option<pb::StringFilter>) -> usize {
        f.as_ref().map_or(0, |f| {
            usize::from(f.equal_to.is_some())
                + usize::from(f.not_equal_to.is_some())
                + usize::from(!f.value_in.is_empty())
                + usize::from(!f.value_not_in.is_empty())
                + usize::from(f.like.is_some())
                + usize::from(f.i_like.is_some())
        })
    }
    fn boolean(f: &Option<pb::BoolFilter>) -> usize {
        f.as_ref().map_or(0, |f| {
            usize::from(f.equal_to.is_some()) + usize::from(f.not_equal_to.is_some())
        })
    }
    fn time(f: &Option<pb::TimestampFilter>) -> usize {
        f.as_ref().map_or(0, |f| {
            [
                &f.equal_to,
                &f.not_equal_to,
                &f.less_than,
                &f.less_than_equal,
                &f.more_than,
                &f.more_than_equal,
            ]
            .into_iter()
            .filter(|bound| bound.is_some())
            .count()
        })
    }
    if depth > MAX_FILTER_DEPTH {
        return Err(Beyond::Depth);
    }
    // Every field by name, so that a new one cannot be left uncounted.
    let pb::UserFilter {
        id,
        reference,
        email,
        phone,
        first_name,
        last_name,
        locale,
        timezone,
        tenant_id,
        active,
        is_opted_in,
        created_at,
        updated_at,
        custom_data,
        avatar_url,
        delete_time,
        expire_time,
        and,
        or,
        not,
        updated_by,
    } = filter;
    let mut size = [
        id, reference, email, phone, first_name, last_name, locale, timezone, tenant_id, avatar_url,
    ]
    .into_iter()
    .map(string)
    .sum::<usize>()
        + boolean(active)
        + boolean(is_opted_in)
        + [created_at, updated_at, delete_time, expire_time]
            .into_iter()
            .map(time)
            .sum::<usize>()
        + usize::from(custom_data.as_ref().is_some_and(|f| f.contains.is_some()))
        + updated_by.as_ref().map_or(0, |f| {
            usize::from(f.api_key_id.is_some()) + usize::from(f.user_id.is_some())
        });
    let nested = and.iter().chain(or).chain(not.as_deref());
    for inner in nested {
        if size > MAX_FILTER_CONDITIONS {
            break;
        }
        size += 1 + filter_size(inner, depth + 1)?;
    }
    if size > MAX_FILTER_CONDITIONS {
        return Err(Beyond::Conditions);
    }
    Ok(size)
}

/// A value compared with a stored phone number, normalized as CreateUser
/// normalizes one; empty finds the users without one.
fn phone_value(v: &mut Violations, field: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return Some(String::new());
    }
    v.check(field, Phone::parse(value).map(Phone::into_inner))
}

/// A value compared with a stored locale, in its canonical form.
fn locale_value(v: &mut Violations, field: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return Some(String::new());
    }
    v.check(field, Locale::parse(value).map(Locale::into_inner))
}

/// A value compared with a stored time zone, in its canonical form; empty
/// finds the users without one.
fn time_zone_value(v: &mut Violations, field: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return Some(String::new());
    }
    v.check(field, TimeZone::parse(value).map(TimeZone::into_inner))
}

/// The conditions of one (possibly nested) filter at `path`, ANDed.
fn filter_conditions(
    v: &mut Violations,
    path: &str,
    filter: &pb::UserFilter,
) -> Vec<users::Condition> {
    use users::{BoolField, Condition, TextField, TimeField, UuidField};
    type Parse = fn(&mut Violations, &str, &str) -> Option<String>;
    let at = |name: &str| format!("{path}.{name}");
    let mut conditions = Vec::new();
    let text_fields: [(_, _, _, Parse); 8] = [
        (
            &filter.reference,
            TextField::Reference,
            "reference",
            filter_value,
        ),
        (&filter.email, TextField::Email, "email", filter_value),
        (&filter.phone, TextField::Phone, "phone", phone_value),
        (
            &filter.first_name,
            TextField::FirstName,
            "first_name",
            filter_value,
        ),
        (
            &filter.last_name,
            TextField::LastName,
            "last_name",
            filter_value,
        ),
        (&filter.locale, TextField::Locale, "locale", locale_value),
        (
            &filter.timezone,
            TextField::Timezone,
            "timezone",
            time_zone_value,
        ),
        (
            &filter.avatar_url,
            TextField::AvatarUrl,
            "avatar_url",
            filter_value,
        ),
    ];
    for (filter, field, name, parse) in text_fields {
        if let Some(filter) = filter {
            conditions.extend(
                string_ops(v, &at(name), filter, parse)
                    .into_iter()
                    .map(|op| Condition::Text(field, op)),
            );
        }
    }
    for (filter, field, name) in [
        (&filter.id, UuidField::Id, "id"),
        (&filter.tenant_id, UuidField::TenantId, "tenant_id"),
    ] {
        if let Some(filter) = filter {
            conditions.extend(
                uuid_ops(v, &at(name), filter)
                    .into_iter()
                    .map(|op| Condition::Uuid(field, op)),
            );
        }
    }
    for (filter, field) in [
        (&filter.active, BoolField::Active),
        (&filter.is_opted_in, BoolField::IsOptedIn),
    ] {
        if let Some(filter) = filter {
            conditions.extend(
                bool_conditions(filter)
                    .into_iter()
                    .map(|value| Condition::Bool(field, value)),
            );
        }
    }
    for (filter, field, name) in [
        (&filter.created_at, TimeField::CreatedAt, "created_at"),
        (&filter.updated_at, TimeField::UpdatedAt, "updated_at"),
        (&filter.delete_time, TimeField::DeleteTime, "delete_time"),
        (&filter.expire_time, TimeField::ExpireTime, "expire_time"),
    ] {
        if let Some(filter) = filter {
            conditions.extend(
                time_ops(v, &at(name), filter)
                    .into_iter()
                    .map(|op| Condition::Time(field, op)),
            );
        }
    }
    if let Some(contains) = filter
        .custom_data
        .as_ref()
        .and_then(|f| f.contains.as_ref())
    {
        if let Some(data) = v.check(
            &at("custom_data.contains"),
            super::json::custom_data(contains),
        ) {
            conditions.push(Condition::CustomDataContains(data.into_value()));
        }
    }
    if let Some(actor) = &filter.updated_by {
        if let Some(key) = &actor.api_key_id {
            conditions.extend(
                filter_value(v, &at("updated_by.api_key_id"), key)
                    .map(|key| Condition::UpdatedBy(Actor::key(&key))),
            );
        }
        if let Some(user) = &actor.user_id {
            conditions.extend(
                v.check(&at("updated_by.user_id"), uuid(user))
                    .map(|user| Condition::UpdatedBy(Actor::user(user))),
            );
        }
    }
    for (i, inner) in filter.and.iter().enumerate() {
        let inner = filter_conditions(v, &at(&format!("and[{i}]")), inner);
        conditions.push(Condition::All(inner));
    }
    if !filter.or.is_empty() {
        let any = filter
            .or
            .iter()
            .enumerate()
            .map(|(i, inner)| Condition::All(filter_conditions(v, &at(&format!("or[{i}]")), inner)))
            .collect();
        conditions.push(Condition::Any(any));
    }
    if let Some(inner) = &filter.not {
        let inner = filter_conditions(v, &at("not"), inner);
        conditions.push(Condition::Not(Box::new(Condition::All(inner))));
    }
    conditions
}

fn user_order(v: &mut Violations, order: &[pb::UserOrder]) -> Vec<(users::OrderField, Direction)> {
    use pb::UserOrderField as F;
    use users::OrderField;
    if order.is_empty() {
        return vec![(OrderField::CreatedAt, Direction::Asc)];
    }
    if order.len() > MAX_ORDER_TERMS {
        v.push(
            "order",
            format!("must have at most {MAX_ORDER_TERMS} terms, one per field"),
        );
        return Vec::new();
    }
    let mut seen = Vec::with_capacity(order.len());
    order
        .iter()
        .enumerate()
        .filter_map(|(i, term)| {
            let field = match F::try_from(term.field) {
                Ok(F::CreatedAt) => OrderField::CreatedAt,
                Ok(F::UpdatedAt) => OrderField::UpdatedAt,
                Ok(F::Email) => OrderField::Email,
                Ok(F::FirstName) => OrderField::FirstName,
                Ok(F::LastName) => OrderField::LastName,
                Ok(F::Locale) => OrderField::Locale,
                Ok(F::Phone) => OrderField::Phone,
                Ok(F::Timezone) => OrderField::Timezone,
                Ok(F::Reference) => OrderField::Reference,
                Ok(F::Active) => OrderField::Active,
                Ok(F::Unspecified) | Err(_) => {
                    v.push(format!("order[{i}].field"), "must name a field to order by");
                    return None;
                }
            };
            let direction = match pb::SortDirection::try_from(term.direction) {
                Ok(pb::SortDirection::Unspecified | pb::SortDirection::Asc) => Direction::Asc,
                Ok(pb::SortDirection::Desc) => Direction::Desc,
                Err(_) => {
                    v.push(format!("order[{i}].direction"), "must be ASC or DESC");
                    return None;
                }
            };
            if seen.contains(&field) {
                v.push(
                    format!("order[{i}].field"),
                    "orders by a field an earlier term already orders by",
                );
                return None;
            }
            seen.push(field);
            Some((field, direction))
        })
        .collect()
}

/// The condition of a non-empty `search`.
fn search(v: &mut Violations, search: &str) -> Option<users::Condition> {
    if search.is_empty() {
        return None;
    }
    v.check("search", bounded_text(search, MAX_SEARCH_CHARS))
        .map(users::Condition::Search)
}

/// A parsed ListUsers request and the fingerprint its page tokens carry.
pub struct UserList {
    pub query: users::ListQuery,
    pub fingerprint: String,
}

pub fn user_list(request: &pb::ListUsersRequest) -> Result<UserList, Error> {
    let mut v = Violations::new();
    let paging = paging(&mut v, request.limit, request.offset, &request.page_token);
    let mut conditions = request
        .filter
        .as_ref()
        .map(|filter| user_conditions(&mut v, filter))
        .unwrap_or_default();
    conditions.extend(search(&mut v, &request.search));
    if !request.show_deleted {
        conditions.push(users::Condition::Live);
    }
    let order = user_order(&mut v, &request.order);
    let fingerprint = fingerprint(
        "users",
        &pb::ListUsersRequest {
            filter: request.filter.clone(),
            search: request.search.clone(),
            order: request.order.clone(),
            show_deleted: request.show_deleted,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let after = decode_token(&mut v, &request.page_token, &fingerprint);
    let count_limit = request.total_count_limit.map(|limit| {
        if !(1..=MAX_COUNT_LIMIT).contains(&limit) {
            v.push(
                "total_count_limit",
                format!("must be between 1 and {MAX_COUNT_LIMIT}"),
            );
        }
        i64::from(limit)
    });
    if !v.is_empty() {
        return Err(Error::InvalidArgument(v.into_vec()));
    }
    Ok(UserList {
        query: users::ListQuery {
            conditions,
            order,
            after,
            limit: paging.limit,
            offset: paging.offset,
            count_total: !request.skip_total_count,
            count_limit,
        },
        fingerprint,
    })
}

/// A parsed ListTenants request and the fingerprint its page tokens carry.
pub struct TenantList {
    pub query: tenants::ListQuery,
    pub fingerprint: String,
}

pub fn tenant_list(request: &pb::ListTenantsRequest) -> Result<TenantList, Error> {
    let mut v = Violations::new();
    let paging = paging(&mut v, request.limit, request.offset, &request.page_token);
    let mut conditions = Vec::new();
    if let Some(filter) = &request.filter {
        if let Some(id) = &filter.id {
            conditions.extend(
                uuid_ops(&mut v, "filter.id", id)
                    .into_iter()
                    .map(tenants::Condition::Id),
            );
        }
        if let Some(reference) = &filter.reference {
            conditions.extend(
                text_ops(&mut v, "filter.reference", reference)
                    .into_iter()
                    .map(tenants::Condition::Reference),
            );
        }
    }
    if !request.show_deleted {
        conditions.push(tenants::Condition::Live);
    }
    let fingerprint = fingerprint(
        "tenants",
        &pb::ListTenantsRequest {
            filter: request.filter.clone(),
            show_deleted: request.show_deleted,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let after = decode_token(&mut v, &request.page_token, &fingerprint);
    if !v.is_empty() {
        return Err(Error::InvalidArgument(v.into_vec()));
    }
    Ok(TenantList {
        query: tenants::ListQuery {
            conditions,
            after,
            limit: paging.limit,
            offset: paging.offset,
            count_total: !request.skip_total_count,
        },
        fingerprint,
    })
}

/// The conditions of an ExportUsers request: the ListUsers filters and search.
pub fn export_conditions(request: &pb::ExportUsersRequest) -> Result<Vec<users::Condition>, Error> {
    let mut v = Violations::new();
    let mut conditions = request
        .filter
        .as_ref()
        .map(|filter| user_conditions(&mut v, filter))
        .unwrap_or_default();
    conditions.extend(search(&mut v, &request.search));
    if !request.show_deleted {
        conditions.push(users::Condition::Live);
    }
    if !v.is_empty() {
        return Err(Error::InvalidArgument(v.into_vec()));
    }
    Ok(conditions)
}
