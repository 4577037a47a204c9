//! Request generators (proptest strategies) for every RPC: valid-ish
//! messages whose fields come from the values an attacker or a careless
//! client would send, and their wire bytes, sometimes broken.

use proptest::{collection::vec, option, prelude::*};
use prost::Message;
use prost_types::{Struct, Timestamp, Value, value::Kind};
use users_service::pb::v1 as pb;

/// Text for any string field: mostly ordinary, often at or past a limit,
/// sometimes hostile.
pub fn text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => Just(String::new()),
        6 => "[a-zA-Z0-9 ._@+-]{1,24}",
        2 => "[%_a-z\\\\]{0,12}",
        2 => any::<String>().prop_map(|s| s.chars().take(40).collect()),
        2 => uuid(),
        1 => "[a-z]{1,8}@[a-z]{1,8}\\.(com|org)",
        1 => "\\+[0-9]{6,16}",
        1 => "[a-z]{2}(-[A-Za-z]{2})?",
        1 => prop::sample::select(vec!["Europe/Paris", "asia/bangkok", "UTC", "Mars/Olympus"])
            .prop_map(str::to_owned),
        1 => prop::sample::select(vec![
            "https://example.com/a.png",
            "ftp://example.com/x",
            "http://",
        ])
        .prop_map(str::to_owned),
        2 => prop::sample::select(vec![
            "\0",
            "a\0b",
            "\u{202E}evil",
            "\u{200B}",
            "\u{FEFF}x",
            "line\u{2028}break",
            "tab\there",
            "abc\\",
            "%",
            "_%\\%",
        ])
        .prop_map(str::to_owned),
        2 => (0usize..5).prop_map(|k| "é".repeat([64, 65, 101, 256, 2049][k])),
        1 => (0usize..2).prop_map(|k| "x".repeat([100_000, 1_000_000][k])),
    ]
    .boxed()
}

pub fn uuid() -> BoxedStrategy<String> {
    any::<u128>()
        .prop_map(|n| uuid::Uuid::from_u128(n).to_string())
        .boxed()
}

/// A JSON value of a Struct, nested up to about ten levels (past the
/// limit of eight), with hostile strings and numbers.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<bool>().prop_map(Kind::BoolValue),
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(1e308),
            Just(-0.0)
        ]
        .prop_map(Kind::NumberValue),
        text().prop_map(Kind::StringValue),
    ]
    .prop_map(|kind| Value { kind: Some(kind) });
    prop_oneof![
        20 => leaf.clone(),
        1 => Just(Value { kind: None }),
    ]
    .prop_recursive(10, 64, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|values| Value {
                kind: Some(Kind::ListValue(prost_types::ListValue { values })),
            }),
            vec((text(), inner), 0..4).prop_map(|fields| Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: fields.into_iter().collect(),
                })),
            }),
        ]
    })
    .boxed()
}

pub fn json_object() -> BoxedStrategy<Struct> {
    prop_oneof![
        10 => vec((text(), json_value()), 0..5).prop_map(|fields| Struct {
            fields: fields.into_iter().collect(),
        }),
        // Past prost's recursion limit.
        1 => (30usize..70).prop_map(nested),
        // Past the 16 KiB limit.
        1 => Just(Struct {
            fields: [(
                "big".to_owned(),
                Value {
                    kind: Some(Kind::StringValue("b".repeat(17_000))),
                },
            )]
            .into(),
        }),
    ]
    .boxed()
}

fn nested(levels: usize) -> Struct {
    let mut data = Struct::default();
    for _ in 0..levels {
        data = Struct {
            fields: [(
                "k".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(data)),
                },
            )]
            .into(),
        };
    }
    data
}

fn timestamp() -> BoxedStrategy<Timestamp> {
    prop_oneof![
        (0i64..4_000_000_000, 0i32..1_000_000_000)
            .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
    ]
    .boxed()
}

fn enum_value() -> BoxedStrategy<i32> {
    prop_oneof![8 => 0i32..12, 1 => any::<i32>()].boxed()
}

pub fn user() -> BoxedStrategy<pb::User> {
    (
        (text(), text(), option::of(text()), text(), text(), text()),
        (option::of(text()), any::<bool>(), option::of(any::<bool>())),
        (
            prop_oneof![4 => Just(String::new()), 1 => uuid(), 1 => text()],
            option::of(json_object()),
            text(),
        ),
    )
        .prop_map(
            |(
                (reference, email, phone, first_name, last_name, locale),
                (timezone, is_opted_in, active),
                (tenant_id, custom_data, avatar_url),
            )| pb::User {
                id: String::new(),
                reference,
                email,
                phone,
                first_name,
                last_name,
                locale,
                timezone,
                is_opted_in,
                active,
                synced: false,
                tenant_id,
                custom_data,
                avatar_url,
                created_at: None,
                updated_at: None,
                ..Default::default()
            },
        )
        .boxed()
}

fn user_update() -> BoxedStrategy<pb::UserUpdate> {
    (
        (
            option::of(text()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
        ),
        (
            option::of(text()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(json_object()),
            option::of(text()),
        ),
    )
        .prop_map(
            |(
                (email, phone, first_name, last_name, locale),
                (timezone, is_opted_in, active, custom_data, avatar_url),
            )| pb::UserUpdate {
                email,
                phone,
                first_name,
                last_name,
                locale,
                timezone,
                is_opted_in,
                active,
                custom_data,
                avatar_url,
            },
        )
        .boxed()
}

fn string_filter() -> BoxedStrategy<pb::StringFilter> {
    let values = prop_oneof![
        10 => vec(text(), 0..4),
        1 => vec(text(), 99..103),
    ];
    (
        option::of(text()),
        option::of(text()),
        values.clone(),
        values,
        option::of(text()),
        option::of(text()),
    )
        .prop_map(
            |(equal_to, not_equal_to, value_in, value_not_in, like, i_like)| pb::StringFilter {
                equal_to,
                not_equal_to,
                value_in,
                value_not_in,
                like,
                i_like,
            },
        )
        .boxed()
}

fn bool_filter() -> BoxedStrategy<pb::BoolFilter> {
    (option::of(any::<bool>()), option::of(any::<bool>()))
        .prop_map(|(equal_to, not_equal_to)| pb::BoolFilter {
            equal_to,
            not_equal_to,
        })
        .boxed()
}

fn timestamp_filter() -> BoxedStrategy<pb::TimestampFilter> {
    vec(option::of(timestamp()), 6)
        .prop_map(|t| pb::TimestampFilter {
            equal_to: t[0],
            not_equal_to: t[1],
            less_than: t[2],
            less_than_equal: t[3],
            more_than: t[4],
            more_than_equal: t[5],
        })
        .boxed()
}

/// A filter with a few fields set (all of them would be mostly refusals),
/// sometimes composed with `and`, `or` and `not`, up to past the nesting
/// and size limits.
fn user_filter() -> BoxedStrategy<pb::UserFilter> {
    flat_user_filter()
        .prop_recursive(6, 96, 8, |inner| {
            (
                flat_user_filter(),
                vec(inner.clone(), 0..4),
                vec(inner.clone(), 0..4),
                option::of(inner),
            )
                .prop_map(|(mut filter, and, or, not)| {
                    filter.and = and;
                    filter.or = or;
                    filter.not = not.map(Box::new);
                    filter
                })
        })
        .boxed()
}

/// A filter on fields only.
fn flat_user_filter() -> BoxedStrategy<pb::UserFilter> {
    let sometimes =
        |s: BoxedStrategy<pb::StringFilter>| prop_oneof![4 => Just(None), 1 => s.prop_map(Some)];
    let rarely_time = || prop_oneof![6 => Just(None), 1 => timestamp_filter().prop_map(Some)];
    (
        (
            sometimes(string_filter()),
            sometimes(string_filter()),
            sometimes(string_filter()),
            sometimes(string_filter()),
            sometimes(string_filter()),
            sometimes(string_filter()),
            sometimes(string_filter()),
        ),
        (
            sometimes(string_filter()),
            sometimes(string_filter()),
            option::of(bool_filter()),
            option::of(bool_filter()),
            option::of(timestamp_filter()),
            option::of(timestamp_filter()),
            prop_oneof![4 => Just(None), 1 => json_object().prop_map(|contains| Some(pb::JsonFilter { contains: Some(contains) }))],
        ),
        (
            sometimes(string_filter()),
            rarely_time(),
            rarely_time(),
            prop_oneof![
                6 => Just(None),
                1 => (option::of(text()), option::of(text()))
                    .prop_map(|(api_key_id, user_id)| Some(pb::ActorFilter { api_key_id, user_id })),
            ],
        ),
    )
        .prop_map(
            |(
                (id, reference, email, phone, first_name, last_name, locale),
                (timezone, tenant_id, active, is_opted_in, created_at, updated_at, custom_data),
                (avatar_url, delete_time, expire_time, updated_by),
            )| pb::UserFilter {
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
                updated_by,
                and: Vec::new(),
                or: Vec::new(),
                not: None,
            },
        )
        .boxed()
}

fn orders() -> BoxedStrategy<Vec<pb::UserOrder>> {
    let term = (enum_value(), enum_value())
        .prop_map(|(field, direction)| pb::UserOrder { field, direction });
    prop_oneof![
        10 => vec(term.clone(), 0..4),
        2 => vec(term.clone(), 8..14),
        1 => vec(term, 500..2000),
    ]
    .boxed()
}

fn limit() -> BoxedStrategy<Option<i32>> {
    option::of(prop_oneof![5 => 0i32..60, 1 => 990i32..1010, 1 => any::<i32>()]).boxed()
}

fn offset() -> BoxedStrategy<i32> {
    prop_oneof![5 => Just(0), 3 => 0i32..50, 1 => 99_990i32..100_010, 1 => any::<i32>()].boxed()
}

/// One call: the method path and its request, as a message.
#[derive(Debug, Clone)]
pub enum Call {
    CreateUser(pb::CreateUserRequest),
    GetUser(pb::GetUserRequest),
    UpdateUser(pb::UpdateUserRequest),
    DeactivateUser(pb::DeactivateUserRequest),
    ReactivateUser(pb::ReactivateUserRequest),
    ListUsers(pb::ListUsersRequest),
    BatchUpsertUsers(pb::BatchUpsertUsersRequest),
    ExportUsers(pb::ExportUsersRequest),
    WatchUsers(pb::WatchUsersRequest),
    CreateTenant(pb::CreateTenantRequest),
    GetTenant(pb::GetTenantRequest),
    UpdateTenant(pb::UpdateTenantRequest),
    ListTenants(pb::ListTenantsRequest),
    CreateKey(pb::CreateKeyRequest),
    ListKeys(pb::ListKeysRequest),
    RevokeKey(pb::RevokeKeyRequest),
}

impl Call {
    pub fn path(&self) -> &'static str {
        match self {
            Self::CreateUser(_) => "/users.v1.UsersService/CreateUser",
            Self::GetUser(_) => "/users.v1.UsersService/GetUser",
            Self::UpdateUser(_) => "/users.v1.UsersService/UpdateUser",
            Self::DeactivateUser(_) => "/users.v1.UsersService/DeactivateUser",
            Self::ReactivateUser(_) => "/users.v1.UsersService/ReactivateUser",
            Self::ListUsers(_) => "/users.v1.UsersService/ListUsers",
            Self::BatchUpsertUsers(_) => "/users.v1.UsersService/BatchUpsertUsers",
            Self::ExportUsers(_) => "/users.v1.UsersService/ExportUsers",
            Self::WatchUsers(_) => "/users.v1.UsersService/WatchUsers",
            Self::CreateTenant(_) => "/users.v1.TenantsService/CreateTenant",
            Self::GetTenant(_) => "/users.v1.TenantsService/GetTenant",
            Self::UpdateTenant(_) => "/users.v1.TenantsService/UpdateTenant",
            Self::ListTenants(_) => "/users.v1.TenantsService/ListTenants",
            Self::CreateKey(_) => "/users.v1.KeysService/CreateKey",
            Self::ListKeys(_) => "/users.v1.KeysService/ListKeys",
            Self::RevokeKey(_) => "/users.v1.KeysService/RevokeKey",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::CreateUser(m) => m.encode_to_vec(),
            Self::GetUser(m) => m.encode_to_vec(),
            Self::UpdateUser(m) => m.encode_to_vec(),
            Self::DeactivateUser(m) => m.encode_to_vec(),
            Self::ReactivateUser(m) => m.encode_to_vec(),
            Self::ListUsers(m) => m.encode_to_vec(),
            Self::BatchUpsertUsers(m) => m.encode_to_vec(),
            Self::ExportUsers(m) => m.encode_to_vec(),
            Self::WatchUsers(m) => m.encode_to_vec(),
            Self::CreateTenant(m) => m.encode_to_vec(),
            Self::GetTenant(m) => m.encode_to_vec(),
            Self::UpdateTenant(m) => m.encode_to_vec(),
            Self::ListTenants(m) => m.encode_to_vec(),
            Self::CreateKey(m) => m.encode_to_vec(),
            Self::ListKeys(m) => m.encode_to_vec(),
            Self::RevokeKey(m) => m.encode_to_vec(),
        }
    }

    /// Where the call can take an id or a page token the server gave out.
    pub fn ids_mut(&mut self) -> Vec<&mut String> {
        match self {
            Self::GetUser(m) => vec![&mut m.id],
            Self::UpdateUser(m) => vec![&mut m.id],
            Self::DeactivateUser(m) => vec![&mut m.id],
            Self::ReactivateUser(m) => vec![&mut m.id],
            Self::GetTenant(m) => vec![&mut m.id],
            Self::UpdateTenant(m) => vec![&mut m.id],
            _ => Vec::new(),
        }
    }

    pub fn page_token_mut(&mut self) -> Option<&mut String> {
        match self {
            Self::ListUsers(m) => Some(&mut m.page_token),
            Self::ListTenants(m) => Some(&mut m.page_token),
            Self::WatchUsers(m) => Some(&mut m.resume_token),
            _ => None,
        }
    }
}

pub fn call() -> BoxedStrategy<Call> {
    let id = || prop_oneof![3 => uuid(), 1 => text()];
    prop_oneof![
        4 => option::of(user()).prop_map(|user| Call::CreateUser(pb::CreateUserRequest { user, ..Default::default() })),
        3 => id().prop_map(|id| Call::GetUser(pb::GetUserRequest { id, ..Default::default() })),
        3 => (id(), option::of(user_update()))
            .prop_map(|(id, user)| Call::UpdateUser(pb::UpdateUserRequest { id, user, ..Default::default() })),
        1 => id().prop_map(|id| Call::DeactivateUser(pb::DeactivateUserRequest { id, ..Default::default() })),
        1 => id().prop_map(|id| Call::ReactivateUser(pb::ReactivateUserRequest { id, ..Default::default() })),
        6 => (
            (limit(), offset(), option::of(user_filter()), text()),
            (orders(), text(), any::<bool>(), option::of(any::<i32>()))
        )
            .prop_map(|((limit, offset, filter, search), (order, page_token, skip_total_count, total_count_limit))| {
                Call::ListUsers(pb::ListUsersRequest {
                    limit,
                    offset,
                    filter,
                    search,
                    order,
                    page_token,
                    skip_total_count,
                    total_count_limit, ..Default::default() })
            }),
        2 => prop_oneof![10 => vec(user(), 0..12), 1 => vec(user(), 1001..1002)]
            .prop_map(|users| Call::BatchUpsertUsers(pb::BatchUpsertUsersRequest { users, ..Default::default() })),
        1 => (option::of(user_filter()), text())
            .prop_map(|(filter, search)| Call::ExportUsers(pb::ExportUsersRequest { filter, search, ..Default::default() })),
        1 => (
            prop_oneof![2 => Just(String::new()), 1 => id()],
            prop_oneof![2 => Just(String::new()), 1 => text()],
            prop_oneof![2 => Just(Vec::new()), 1 => vec(-2..10i32, 0..10)],
        )
            .prop_map(|(tenant_id, resume_token, types)| Call::WatchUsers(pb::WatchUsersRequest { resume_token, tenant_id, types })),
        1 => (text(), text()).prop_map(|(name, reference)| Call::CreateTenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant { name, reference, ..Default::default() }), ..Default::default() })),
        1 => id().prop_map(|id| Call::GetTenant(pb::GetTenantRequest { id, ..Default::default() })),
        1 => (id(), option::of(text()), option::of(text())).prop_map(|(id, name, reference)| {
            Call::UpdateTenant(pb::UpdateTenantRequest {
                id,
                tenant: Some(pb::TenantUpdate { name, reference }), ..Default::default() })
        }),
        1 => (limit(), offset(), option::of(string_filter()), text(), any::<bool>()).prop_map(
            |(limit, offset, reference, page_token, skip_total_count)| {
                Call::ListTenants(pb::ListTenantsRequest {
                    limit,
                    offset,
                    filter: reference.map(|reference| pb::TenantFilter {
                        id: None,
                        reference: Some(reference),
                    }),
                    page_token,
                    skip_total_count, ..Default::default() })
            }
        ),
        1 => (text(), enum_value(), prop_oneof![2 => Just(String::new()), 1 => id()], option::of(any::<i32>()), option::of(timestamp()), text())
            .prop_map(|(name, role, tenant_id, rate_limit_per_second, expire_time, client_name)| {
                Call::CreateKey(pb::CreateKeyRequest { name, role, tenant_id, rate_limit_per_second, expire_time, client_name })
            }),
        1 => (prop_oneof![3 => 0i32..20, 1 => any::<i32>()], text(), any::<bool>())
            .prop_map(|(page_size, page_token, show_revoked)| Call::ListKeys(pb::ListKeysRequest { page_size, page_token, show_revoked })),
        // Never an id the server gave out: the run's own admin key stays.
        1 => text().prop_map(|id| Call::RevokeKey(pb::RevokeKeyRequest { id })),
    ]
    .boxed()
}
