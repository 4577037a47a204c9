//! ListUsers queries as a ROQ client and an admin dashboard write them:
//! values compared the way they are stored, composed filters, the order
//! people read, and their limits.

use tonic::Code;
use users_service::auth::Role;
use users_service::pb::v1::{
    ActorFilter, BoolFilter, DeleteUserRequest, JsonFilter, ListUsersRequest, SortDirection,
    TimestampFilter, User, UserFilter, UserOrder, UserOrderField,
};

use crate::helpers::{spawn_app, violated_fields};
use crate::list::{any_of, assert_filter, eq, ids, like, list, list_err, ne, none_of, on, walk};
use crate::tenants::create_tenant;
use crate::users::{create, user};

fn named(reference: &str, first: &str, last: &str) -> User {
    User {
        reference: reference.into(),
        first_name: first.into(),
        last_name: last.into(),
        ..Default::default()
    }
}

/// The most conditions a filter may have in all.
const MAX: usize = 64;

fn filtered(filter: UserFilter) -> ListUsersRequest {
    ListUsersRequest {
        limit: Some(1000),
        filter: Some(filter),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Fidelity
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_empty_value_in_is_no_condition_and_matches_every_user() {
    let mut app = spawn_app().await;
    let a = create(&mut app, user("a", "a@example.com")).await;
    let b = create(&mut app, user("b", "b@example.com")).await;
    // proto3 cannot tell `valueIn: []` from no valueIn: both are no condition.
    assert_filter(&mut app, on("email", any_of::<&str>(&[])), &[&a, &b]).await;
    assert_filter(&mut app, on("email", none_of::<&str>(&[])), &[&a, &b]).await;
}

#[tokio::test]
async fn email_comparisons_ignore_case_as_its_uniqueness_does() {
    let mut app = spawn_app().await;
    let mixed = create(&mut app, user("m", "Mixed.Case@Example.COM")).await;
    let other = create(&mut app, user("o", "other@example.com")).await;
    let none = create(&mut app, user("n", "")).await;

    assert_filter(
        &mut app,
        on("email", eq("mixed.case@example.com")),
        &[&mixed],
    )
    .await;
    assert_filter(
        &mut app,
        on("email", eq("MIXED.CASE@EXAMPLE.COM")),
        &[&mixed],
    )
    .await;
    assert_filter(
        &mut app,
        on("email", ne("mixed.case@example.com")),
        &[&other, &none],
    )
    .await;
    assert_filter(
        &mut app,
        on(
            "email",
            any_of(&["OTHER@example.com", "mixed.case@EXAMPLE.com"]),
        ),
        &[&mixed, &other],
    )
    .await;
    assert_filter(
        &mut app,
        on("email", none_of(&["mixed.CASE@example.com"])),
        &[&other, &none],
    )
    .await;
    // The empty value finds the users without an email, in lists too.
    assert_filter(&mut app, on("email", eq("")), &[&none]).await;
    assert_filter(
        &mut app,
        on("email", any_of(&["", "Other@Example.com"])),
        &[&other, &none],
    )
    .await;
    // Patterns stay raw: LIKE is case-sensitive.
    assert_filter(&mut app, on("email", like("mixed%")), &[]).await;
    assert_filter(&mut app, on("email", like("Mixed%")), &[&mixed]).await;
}

#[tokio::test]
async fn phone_locale_and_timezone_values_are_normalized_as_inputs_are() {
    let mut app = spawn_app().await;
    let us = create(
        &mut app,
        User {
            reference: "us".into(),
            phone: Some("+1 555 000 1234".into()),
            locale: "en-US".into(),
            timezone: Some("Asia/Bangkok".into()),
            ..Default::default()
        },
    )
    .await;
    let bare = create(
        &mut app,
        User {
            reference: "bare".into(),
            locale: "de-DE".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(us.phone.as_deref(), Some("+15550001234"));

    assert_filter(&mut app, on("phone", eq("+1 555 000 1234")), &[&us]).await;
    assert_filter(&mut app, on("phone", eq("+1 (555) 000-1234")), &[&us]).await;
    assert_filter(&mut app, on("phone", any_of(&["+1-555-000-1234"])), &[&us]).await;
    assert_filter(&mut app, on("phone", ne("+1 555 000 1234")), &[&bare]).await;
    assert_filter(&mut app, on("phone", eq("")), &[&bare]).await;
    assert_filter(&mut app, on("locale", eq("en-us")), &[&us]).await;
    assert_filter(&mut app, on("locale", none_of(&["EN-us"])), &[&bare]).await;
    assert_filter(&mut app, on("timezone", eq("Asia/Bangkok")), &[&us]).await;
    assert_filter(&mut app, on("timezone", eq("")), &[&bare]).await;
    // Patterns compare the stored, normalized text as given.
    assert_filter(&mut app, on("phone", like("+1 555%")), &[]).await;
    assert_filter(&mut app, on("phone", like("+1555%")), &[&us]).await;

    // A value that cannot be what it filters is a bad argument, named.
    let status = list_err(
        &mut app,
        filtered(UserFilter {
            phone: Some(any_of(&["+15550001234", "call me"])),
            locale: Some(eq("en_US")),
            timezone: Some(eq("Mars/Olympus")),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&status),
        [
            "filter.locale.equal_to",
            "filter.phone.value_in[1]",
            "filter.timezone.equal_to"
        ]
    );
}

#[tokio::test]
async fn avatar_url_deletion_and_last_actor_have_filters() {
    let mut app = spawn_app().await;
    let pictured = create(
        &mut app,
        User {
            reference: "p".into(),
            avatar_url: "https://example.com/p.png".into(),
            ..Default::default()
        },
    )
    .await;
    let plain = create(&mut app, user("q", "")).await;
    let gone = create(&mut app, user("g", "")).await;
    assert_filter(
        &mut app,
        on("avatar_url", eq("https://example.com/p.png")),
        &[&pictured],
    )
    .await;
    assert_filter(&mut app, on("avatar_url", eq("")), &[&plain, &gone]).await;

    app.users
        .delete_user(DeleteUserRequest {
            id: gone.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deleted = |filter: TimestampFilter| ListUsersRequest {
        limit: Some(1000),
        show_deleted: true,
        filter: Some(UserFilter {
            delete_time: Some(filter),
            ..Default::default()
        }),
        ..Default::default()
    };
    let epoch = prost_types::Timestamp::default();
    let page = list(
        &mut app,
        deleted(TimestampFilter {
            more_than: Some(epoch),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(ids(&page.data), std::slice::from_ref(&gone.id));
    // A user that is not deleted never matches a deletion-time condition,
    // not even its negation.
    let page = list(
        &mut app,
        ListUsersRequest {
            limit: Some(1000),
            show_deleted: true,
            filter: Some(UserFilter {
                not: Some(Box::new(UserFilter {
                    delete_time: Some(TimestampFilter {
                        less_than: Some(epoch),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        page.total_count,
        Some(3),
        "NOT of a false condition is true"
    );

    // Who made the last change: the test's admin key made them all.
    // An API key token is `usk_<id>_<secret>`.
    let key_id = app.admin_token.split('_').nth(1).unwrap().to_owned();
    let by = |actor: ActorFilter| UserFilter {
        updated_by: Some(actor),
        ..Default::default()
    };
    assert_filter(
        &mut app,
        by(ActorFilter {
            api_key_id: Some(key_id),
            ..Default::default()
        }),
        &[&pictured, &plain],
    )
    .await;
    assert_filter(
        &mut app,
        by(ActorFilter {
            api_key_id: Some("another".into()),
            ..Default::default()
        }),
        &[],
    )
    .await;
}

// ---------------------------------------------------------------------------
// Composition
// ---------------------------------------------------------------------------

fn first(name: &str) -> UserFilter {
    on("first_name", eq(name))
}

#[tokio::test]
async fn or_and_and_not_compose_with_the_field_conditions() {
    let mut app = spawn_app().await;
    let ada = create(&mut app, named("1", "Ada", "Lovelace")).await;
    let alan = create(&mut app, named("2", "Alan", "Turing")).await;
    let grace = create(&mut app, named("3", "Grace", "Hopper")).await;
    let alonzo = create(&mut app, named("4", "Alonzo", "Church")).await;

    let or = |filters: Vec<UserFilter>| UserFilter {
        or: filters,
        ..Default::default()
    };
    assert_filter(
        &mut app,
        or(vec![first("Ada"), first("Grace")]),
        &[&ada, &grace],
    )
    .await;
    // Field conditions AND with the `or`.
    assert_filter(
        &mut app,
        UserFilter {
            last_name: Some(like("%r%")),
            ..or(vec![first("Ada"), first("Grace"), first("Alan")])
        },
        &[&alan, &grace],
    )
    .await;
    // `and` of `or`s.
    assert_filter(
        &mut app,
        UserFilter {
            and: vec![
                or(vec![first("Ada"), first("Alan"), first("Alonzo")]),
                or(vec![
                    on("last_name", eq("Church")),
                    on("last_name", eq("Lovelace")),
                ]),
            ],
            ..Default::default()
        },
        &[&ada, &alonzo],
    )
    .await;
    // `not`, and `not` of an `or`.
    assert_filter(
        &mut app,
        UserFilter {
            not: Some(Box::new(first("Ada"))),
            ..Default::default()
        },
        &[&alan, &grace, &alonzo],
    )
    .await;
    assert_filter(
        &mut app,
        UserFilter {
            not: Some(Box::new(or(vec![first("Ada"), first("Alan")]))),
            ..Default::default()
        },
        &[&grace, &alonzo],
    )
    .await;
    // Four levels: or > and > not > field.
    assert_filter(
        &mut app,
        or(vec![
            UserFilter {
                and: vec![UserFilter {
                    not: Some(Box::new(on("last_name", like("%u%")))),
                    ..Default::default()
                }],
                first_name: Some(like("A%")),
                ..Default::default()
            },
            first("Grace"),
        ]),
        &[&ada, &grace],
    )
    .await;
    // An empty filter inside `or` holds for everyone.
    assert_filter(
        &mut app,
        or(vec![first("nobody"), UserFilter::default()]),
        &[&ada, &alan, &grace, &alonzo],
    )
    .await;
}

#[tokio::test]
async fn composed_filters_page_by_token_and_count_exactly() {
    let mut app = spawn_app().await;
    let mut expected = Vec::new();
    for i in 0..9 {
        let name = ["Ada", "Alan", "Grace"][i % 3];
        let created = create(&mut app, named(&format!("r{i}"), name, "X")).await;
        if name != "Alan" {
            expected.push(created.id);
        }
    }
    let filter = UserFilter {
        or: vec![first("Ada"), first("Grace")],
        ..Default::default()
    };
    let request = ListUsersRequest {
        limit: Some(2),
        filter: Some(filter.clone()),
        order: vec![UserOrder {
            field: UserOrderField::FirstName.into(),
            direction: SortDirection::Desc.into(),
        }],
        ..Default::default()
    };
    let first_page = list(&mut app, request.clone()).await;
    assert_eq!(first_page.total_count, Some(6));
    let pages = walk(&mut app, request).await;
    assert_eq!(pages.len(), 3);
    let seen: Vec<String> = pages.concat();
    // Grace before Ada (descending), ties by id (creation order here).
    let graces: Vec<&String> = expected.iter().skip(1).step_by(2).collect();
    let adas: Vec<&String> = expected.iter().step_by(2).collect();
    let mut want: Vec<String> = graces.into_iter().cloned().collect();
    want.extend(adas.into_iter().cloned());
    let mut grace_ids = want[..3].to_vec();
    grace_ids.sort();
    let mut ada_ids = want[3..].to_vec();
    ada_ids.sort();
    assert_eq!(seen[..3], grace_ids[..]);
    assert_eq!(seen[3..], ada_ids[..]);

    // A token made for one composition does not continue another.
    let token = list(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            filter: Some(filter),
            ..Default::default()
        },
    )
    .await
    .next_page_token;
    let status = list_err(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            page_token: token,
            filter: Some(UserFilter {
                or: vec![first("Ada"), first("Alan")],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(violated_fields(&status), ["page_token"]);
}

/// A filter nested `levels` deep (the top level is 1) through `not`.
fn nested(levels: usize) -> UserFilter {
    let mut filter = first("Ada");
    for _ in 1..levels {
        filter = UserFilter {
            not: Some(Box::new(filter)),
            ..Default::default()
        };
    }
    filter
}

#[tokio::test]
async fn composition_is_bounded_in_depth_and_in_conditions() {
    let mut app = spawn_app().await;
    let ada = create(&mut app, named("1", "Ada", "L")).await;
    let alan = create(&mut app, named("2", "Alan", "T")).await;

    // Four levels are fine (not not not Ada = not Ada), five are not.
    assert_filter(&mut app, nested(4), &[&alan]).await;
    let status = list_err(&mut app, filtered(nested(5))).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["filter"]);
    assert!(
        status.message().contains("4 levels"),
        "{}",
        status.message()
    );

    // 64 conditions in all are fine: 32 filters in `or`, one condition each.
    let or_of = |n: usize| UserFilter {
        or: (0..n).map(|i| first(&format!("name{i}"))).collect(),
        ..Default::default()
    };
    let mut filter = or_of(31);
    filter.or.push(first("Ada"));
    assert_filter(&mut app, filter, &[&ada]).await;
    // 33 filters of one condition each are 66.
    let status = list_err(&mut app, filtered(or_of(33))).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["filter"]);
    assert!(
        status.message().contains("64 conditions"),
        "{}",
        status.message()
    );
    // Empty filters count too: a wide `or` of nothing is no way around it.
    let status = list_err(
        &mut app,
        filtered(UserFilter {
            or: vec![UserFilter::default(); 10_000],
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(violated_fields(&status), ["filter"]);
    // Violations inside are reported with their path.
    let status = list_err(
        &mut app,
        filtered(UserFilter {
            or: vec![
                first("Ada"),
                UserFilter {
                    not: Some(Box::new(on("phone", eq("not a phone")))),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        violated_fields(&status),
        ["filter.or[1].not.phone.equal_to"]
    );
}

/// One filter per operator of every field, each with a valid value.
fn one_condition_each() -> Vec<UserFilter> {
    let uuid = "01890000-0000-7000-8000-000000000000";
    let mut filters = Vec::new();
    for (field, value) in [
        ("id", uuid),
        ("reference", "r"),
        ("email", "a@example.com"),
        ("phone", "+1 555 000 1234"),
        ("first_name", "Ada"),
        ("last_name", "L"),
        ("locale", "en-US"),
        ("timezone", "Europe/Berlin"),
        ("tenant_id", uuid),
        ("avatar_url", "https://example.com/a.png"),
    ] {
        for op in [eq(value), ne(value), any_of(&[value]), none_of(&[value])] {
            filters.push(on(field, op));
        }
        filters.push(on(field, like("%a%")));
        filters.push(on(field, crate::list::ilike("%a%")));
    }
    let flags = [true, false].map(|value| BoolFilter {
        equal_to: Some(value).filter(|v| *v),
        not_equal_to: Some(value).filter(|v| !*v),
    });
    for flag in flags {
        filters.push(UserFilter {
            active: Some(flag),
            ..Default::default()
        });
        filters.push(UserFilter {
            is_opted_in: Some(flag),
            ..Default::default()
        });
    }
    let at = Some(prost_types::Timestamp {
        seconds: 1_767_225_600,
        nanos: 0,
    });
    let bounds = [
        TimestampFilter {
            equal_to: at,
            ..Default::default()
        },
        TimestampFilter {
            not_equal_to: at,
            ..Default::default()
        },
        TimestampFilter {
            less_than: at,
            ..Default::default()
        },
        TimestampFilter {
            less_than_equal: at,
            ..Default::default()
        },
        TimestampFilter {
            more_than: at,
            ..Default::default()
        },
        TimestampFilter {
            more_than_equal: at,
            ..Default::default()
        },
    ];
    for bound in bounds {
        let bound = Some(bound);
        filters.extend([
            UserFilter {
                created_at: bound,
                ..Default::default()
            },
            UserFilter {
                updated_at: bound,
                ..Default::default()
            },
            UserFilter {
                delete_time: bound,
                ..Default::default()
            },
            UserFilter {
                expire_time: bound,
                ..Default::default()
            },
        ]);
    }
    filters.push(UserFilter {
        custom_data: Some(JsonFilter {
            contains: Some(prost_types::Struct::default()),
        }),
        ..Default::default()
    });
    filters.push(UserFilter {
        updated_by: Some(ActorFilter {
            api_key_id: Some("key".into()),
            user_id: None,
        }),
        ..Default::default()
    });
    filters.push(UserFilter {
        updated_by: Some(ActorFilter {
            api_key_id: None,
            user_id: Some(uuid.into()),
        }),
        ..Default::default()
    });
    filters
}

#[tokio::test]
async fn every_operator_of_every_field_counts_as_one_condition() {
    let mut app = spawn_app().await;
    let filters = one_condition_each();
    // 10 text fields of 6 operators, 2 flags of 2, 4 times of 6, custom
    // data, and the two actors.
    assert_eq!(filters.len(), 60 + 4 + 24 + 1 + 2);
    for filter in filters {
        // With 63 empty filters beside it (one condition each), 64 in all.
        let mut within = filter.clone();
        within.and = vec![UserFilter::default(); MAX - 1];
        list(&mut app, filtered(within)).await;
        let mut beyond = filter;
        beyond.and = vec![UserFilter::default(); MAX];
        let status = list_err(&mut app, filtered(beyond.clone())).await;
        assert!(
            status.message().contains("64 conditions"),
            "{beyond:?}: {status:?}"
        );
    }
}

#[tokio::test]
async fn a_tenant_key_cannot_leave_its_tenant_with_or_or_not() {
    let mut app = spawn_app().await;
    let tenant_a = create_tenant(&mut app, "A", "a").await;
    let tenant_b = create_tenant(&mut app, "B", "b").await;
    let in_a = create(
        &mut app,
        User {
            tenant_id: tenant_a.id.clone(),
            ..named("a1", "Ada", "A")
        },
    )
    .await;
    let in_b = create(
        &mut app,
        User {
            tenant_id: tenant_b.id.clone(),
            ..named("b1", "Ada", "B")
        },
    )
    .await;
    let key = app
        .create_key(Role::Viewer, Some(tenant_a.id.parse().unwrap()), None)
        .await;
    let mut as_a = app.users_as(Some(&key));

    let escapes = [
        UserFilter {
            or: vec![on("tenant_id", eq(&tenant_b.id)), UserFilter::default()],
            ..Default::default()
        },
        UserFilter {
            or: vec![on("tenant_id", eq(&tenant_b.id))],
            ..Default::default()
        },
        UserFilter {
            not: Some(Box::new(on("tenant_id", eq(&tenant_a.id)))),
            ..Default::default()
        },
        UserFilter {
            or: vec![
                UserFilter {
                    not: Some(Box::new(on("tenant_id", eq(&tenant_a.id)))),
                    ..Default::default()
                },
                first("Ada"),
            ],
            ..Default::default()
        },
        UserFilter {
            active: Some(BoolFilter {
                equal_to: Some(true),
                ..Default::default()
            }),
            not: Some(Box::new(UserFilter {
                or: vec![on("tenant_id", eq(&tenant_a.id))],
                ..Default::default()
            })),
            ..Default::default()
        },
    ];
    for filter in escapes {
        let page = as_a
            .list_users(filtered(filter.clone()))
            .await
            .unwrap()
            .into_inner();
        let found = ids(&page.data);
        assert!(
            !found.contains(&in_b.id),
            "{filter:?} reached another tenant"
        );
        assert!(found.iter().all(|id| *id == in_a.id), "{filter:?}");
        assert_eq!(page.total_count, Some(found.len() as i64), "{filter:?}");
    }
}

// ---------------------------------------------------------------------------
// Order
// ---------------------------------------------------------------------------

#[tokio::test]
async fn text_orders_the_way_people_read_case_insensitively_and_accent_aware() {
    let mut app = spawn_app().await;
    let names = ["Zoe", "anna", "Émile", "Bob", "eve", "Åsa", "bob"];
    let mut by_name = std::collections::HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let created = create(
            &mut app,
            User {
                email: format!("u{i}@example.com"),
                ..named(&format!("ref-{name}"), name, name)
            },
        )
        .await;
        by_name.insert(created.id.clone(), name.to_string());
    }
    // ICU root collation: letters first, then accents, then case
    // (lower case first).
    let expected = ["anna", "Åsa", "bob", "Bob", "Émile", "eve", "Zoe"];
    for field in [
        UserOrderField::FirstName,
        UserOrderField::LastName,
        UserOrderField::Reference,
    ] {
        for (direction, want) in [
            (SortDirection::Asc, expected.to_vec()),
            (
                SortDirection::Desc,
                expected.iter().rev().copied().collect(),
            ),
        ] {
            let request = ListUsersRequest {
                limit: Some(2),
                order: vec![UserOrder {
                    field: field.into(),
                    direction: direction.into(),
                }],
                ..Default::default()
            };
            // Page by page, by token: the cursor compares in the same order.
            let seen: Vec<String> = walk(&mut app, request)
                .await
                .concat()
                .iter()
                .map(|id| by_name[id].clone())
                .collect();
            assert_eq!(seen, want, "{field:?} {direction:?}");
        }
    }
}

#[tokio::test]
async fn the_list_indexes_order_text_in_the_icu_collation() {
    let app = spawn_app().await;
    let rows = app
        .db
        .query(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'users' \
             AND indexname LIKE 'users_tenant_%_order_idx' ORDER BY indexname",
            &[],
        )
        .await
        .unwrap();
    let defs: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(defs.len(), 4, "{defs:?}");
    for (def, column) in defs
        .iter()
        .zip(["email", "first_name", "last_name", "reference"])
    {
        assert!(
            def.contains(&format!("(tenant_id, {column} COLLATE \"und-x-icu\", id)"))
                && def.contains("WHERE (delete_time IS NULL)"),
            "{def}"
        );
    }
    // Every index is valid: built whole by CREATE INDEX CONCURRENTLY.
    let invalid: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
             WHERE c.relname = 'users' AND NOT i.indisvalid",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(invalid, 0);
}
