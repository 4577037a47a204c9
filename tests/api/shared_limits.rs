//! Per-caller rate limits shared by replicas through a `redis-server` of the
//! test's own, stopped and started again under calls.

use std::time::Duration;

use tonic::Code;
use users_service::{auth::Role, pb::v1::GetUserRequest};

use crate::helpers::{
    ChildServer, TestApp, drop_database, fresh_database, redis_server, server, spawn_with,
    test_config,
};

fn url(redis: &ChildServer) -> String {
    format!("redis://127.0.0.1:{}", redis.port)
}

/// `calls` GetUser calls at once with `key`, round-robin over `replicas`:
/// how many passed (the id is malformed: INVALID_ARGUMENT) and how many
/// were limited; any other answer fails the test.
async fn burst(replicas: &[TestApp], key: &str, calls: usize) -> (usize, usize) {
    let calls = (0..calls).map(|i| {
        let mut client = replicas[i % replicas.len()].users_as(Some(key));
        async move {
            client
                .get_user(GetUserRequest {
                    id: "nope".into(),
                    ..Default::default()
                })
                .await
        }
    });
    let mut counted = (0, 0);
    for answer in futures_util::future::join_all(calls).await {
        match answer.map(|_| ()).map_err(|status| status.code()) {
            Err(Code::InvalidArgument) => counted.0 += 1,
            Err(Code::ResourceExhausted) => counted.1 += 1,
            other => panic!("a call got {other:?}"),
        }
    }
    counted
}

/// Three replicas, each caller limited to 5 calls/s (bursts of 5): with
/// Redis, a burst of 30 over the three passes about 5 in all, not 15;
/// Redis holds the caller's count. While Redis is slow or down every call is
/// still answered, each replica limiting alone at its third; once Redis is
/// back, the limit is shared again.
#[tokio::test]
async fn replicas_share_a_callers_limit_through_redis_and_answer_while_it_is_down() {
    let mut redis = redis_server();
    let name = fresh_database().await;
    let config = || {
        let mut config = test_config(Some(server().url(&name)));
        config.rate_limit_per_second = 5;
        config.rate_limit_burst = Some(5);
        config.redis_url = Some(url(&redis));
        // A loaded test machine must not pass for a slow Redis.
        config.redis_timeout = Duration::from_millis(500);
        config.replicas_hint = std::num::NonZeroU32::new(3).unwrap();
        config
    };
    let first = spawn_with(config()).await;
    let mut replicas = vec![first];
    for _ in 0..2 {
        let mut more = config();
        more.data_dir = replicas[0].config.data_dir.clone();
        replicas.push(spawn_with(more).await);
    }
    let key = replicas[0].create_key(Role::Admin, None, None).await;

    let (passed, limited) = burst(&replicas, &key, 30).await;
    // The burst of 5, and what refills while the calls arrive.
    assert!(
        (5..=6).contains(&passed),
        "{passed} passed, {limited} limited"
    );
    let client = redis::Client::open(url(&redis)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let counted: Vec<String> = redis::cmd("KEYS")
        .arg("users-service:quota:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        counted.iter().any(|k| k.contains(&key[4..20])),
        "{counted:?}"
    );

    // Redis slow (it sleeps two seconds, longer than the timeout): every
    // call is answered all the same.
    let sleeper = tokio::spawn(async move {
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(2)
            .query_async::<()>(&mut conn)
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let (passed, limited) = burst(&replicas, &key, 30).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?} for a burst while Redis sleeps ({passed} passed, {limited} limited)",
        started.elapsed()
    );
    sleeper.await.unwrap().unwrap();

    // Redis down: answered all the same, each replica at a third of the rate.
    redis.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut passed_alone = 0;
    for _ in 0..3 {
        let (passed, _) = burst(&replicas, &key, 30).await;
        passed_alone += passed;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        passed_alone >= 3,
        "{passed_alone} passed while Redis was down"
    );

    // Back: after each replica's next try (at most a second apart), shared
    // again.
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = burst(&replicas, &key, 3).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (passed, limited) = burst(&replicas, &key, 30).await;
    assert!(
        (5..=6).contains(&passed),
        "{passed} passed, {limited} limited"
    );

    for replica in replicas {
        replica.shutdown().await;
    }
    drop_database(&name);
}
