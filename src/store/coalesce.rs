//! Folds calls that wait for the database at the same moment into one
//! statement.
//!
//! A call queues its item and, unless a task is already waiting on the
//! queue's behalf, starts one. That task waits for its turn (a few batches of
//! one kind run at once, see [`Batch::POOL_SHARE`]) and for a connection, then
//! takes every item queued by then (up to [`Batch::MAX`]), runs them as one
//! batch and answers each call with its own result. At low load the turn and
//! the connection are free at once and a batch holds a single item: no call
//! ever waits for others to arrive. Under load, items pile up while the task
//! waits and reach Postgres as one statement and one round trip instead of
//! one each.
//!
//! An item whose caller has gone away before its batch starts is dropped.
//! A batch that has started runs while any of its callers waits: its result
//! is theirs too, so an abandoned call's write may still be stored. Once
//! every caller of a running batch is gone, its statement is cancelled in
//! Postgres and its connection closed, as `db::run` does for a call of its
//! own (see `users::write` for the rule).

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use diesel_async::AsyncPgConnection;
use opentelemetry::{
    Context as TraceContext, KeyValue,
    context::FutureExt as _,
    trace::{Link, Span as _, SpanKind, TraceContextExt as _, Tracer as _},
};
use tokio::sync::{Semaphore, oneshot};

use futures_util::future::join_all;
use prometheus_client::metrics::histogram::Histogram;

use super::db::{self, DbPool};
use super::error::StoreError;

/// One kind of work that can be done for many calls at once.
pub trait Batch: Send + Sync + 'static {
    type Item: Send + 'static;
    type Output: Send + 'static;
    /// Most items in one batch.
    const MAX: usize;
    /// At most one batch of this kind runs per this many connections of the
    /// pool (and at least one). Fewer batches at once means larger ones,
    /// which cost Postgres and the server less per item; more than one lets
    /// a slow batch (a lock wait, a slow flush) leave room for the next.
    const POOL_SHARE: usize;
    /// The batch's label in metrics, and the name of its span.
    const NAME: &'static str;
    /// What its statements do (`SELECT`, `INSERT`), and to which table: its
    /// span's `db.operation.name` and `db.collection.name`.
    const STATEMENT: (&'static str, Option<&'static str>);

    /// Runs `items` on `conn`: one result per item, in the same order, or one
    /// error for the whole batch.
    fn run(
        &self,
        conn: &mut AsyncPgConnection,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Result<Vec<Result<Self::Output, StoreError>>, StoreError>> + Send;
}

type Reply<B> = oneshot::Sender<Result<<B as Batch>::Output, StoreError>>;

/// The queue of one [`Batch`] in front of the pool.
pub struct Coalescer<B: Batch> {
    batch: B,
    pool: DbPool,
    /// Items per batch run.
    items: Histogram,
    queue: Mutex<Queue<B>>,
    /// Turns to run a batch: [`Batch::POOL_SHARE`].
    running: Semaphore,
}

struct Queue<B: Batch> {
    /// Each item with its reply and the trace context of the call that sent
    /// it, when spans are exported.
    waiting: Vec<(B::Item, Reply<B>, Option<TraceContext>)>,
    /// A task is waiting for its turn and a connection, and will take what
    /// is queued by then.
    leading: bool,
}

impl<B: Batch> std::fmt::Debug for Coalescer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").finish_non_exhaustive()
    }
}

impl<B: Batch> Coalescer<B> {
    /// `items` observes how many calls each batch serves.
    pub fn new(batch: B, pool: DbPool, items: Histogram) -> Arc<Self> {
        Arc::new(Self {
            batch,
            items,
            running: Semaphore::new((pool.status().max_size / B::POOL_SHARE).max(1)),
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                leading: false,
            }),
            pool,
        })
    }

    /// Runs `item` in the next batch and returns its result.
    pub async fn submit(self: &Arc<Self>, item: B::Item) -> Result<B::Output, StoreError> {
        let (reply, result) = oneshot::channel();
        let lead = {
            let mut queue = self.queue.lock().expect("batch queue lock");
            queue
                .waiting
                .push((item, reply, crate::telemetry::current_context()));
            !std::mem::replace(&mut queue.leading, true)
        };
        if lead {
            Arc::clone(self).start_leader();
        }
        result
            .await
            .unwrap_or_else(|_| Err(StoreError::Other("a batch ended without an answer".into())))
    }

    /// A plain fn, not inlined into `lead`: a spawn of `lead` inside `lead`
    /// would make the compiler prove the future `Send` in terms of itself.
    fn start_leader(self: Arc<Self>) {
        tokio::spawn(self.lead());
    }

    /// Waits for a turn and a connection, then runs what has queued up
    /// meanwhile.
    async fn lead(self: Arc<Self>) {
        let _running = self.running.acquire().await;
        let connection = db::checkout(&self.pool).await;
        let taken: Vec<_> = {
            let mut queue = self.queue.lock().expect("batch queue lock");
            let n = queue.waiting.len().min(B::MAX);
            let taken = queue.waiting.drain(..n).collect();
            // More was queued than one batch holds: the rest gets a task of its own.
            queue.leading = !queue.waiting.is_empty();
            if queue.leading {
                Arc::clone(&self).start_leader();
            }
            taken
        };
        let mut items = Vec::with_capacity(taken.len());
        let mut replies = Vec::with_capacity(taken.len());
        let mut calls = Vec::with_capacity(taken.len());
        for (item, reply, call) in taken {
            if !reply.is_closed() {
                items.push(item);
                replies.push(reply);
                calls.push(call);
            }
        }
        if items.is_empty() {
            return;
        }
        self.items.observe(items.len() as f64);
        let (span, context) = batch_span::<B>(&calls).unzip();
        drop(calls);
        let work = async {
            let mut connection = connection?;
            let outcome = self.batch.run(&mut connection, items).await;
            connection.release();
            outcome
        };
        let work = async {
            match context {
                Some(context) => work.with_context(context).await,
                None => work.await,
            }
        };
        let everyone_gone = join_all(replies.iter_mut().map(oneshot::Sender::closed));
        let outcome = tokio::select! {
            outcome = work => outcome,
            // Dropping `work` cancels the statement and closes its connection.
            _ = everyone_gone => return,
        };
        if let Some(mut span) = span {
            if outcome.is_err() {
                span.set_status(opentelemetry::trace::Status::error("the statement failed"));
            }
            span.end();
        }
        match outcome {
            Ok(results) => {
                debug_assert_eq!(results.len(), replies.len());
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// The span of a batch statement, when spans are exported: the child of the
/// first call it serves, linked to every one. Statements run in its context
/// have no span of their own (`store::traced`): it says what they do.
fn batch_span<B: Batch>(
    calls: &[Option<TraceContext>],
) -> Option<(opentelemetry_sdk::trace::Span, TraceContext)> {
    let tracer = crate::telemetry::tracer()?;
    let parent = calls.first().cloned().flatten().unwrap_or_default();
    let (operation, collection) = B::STATEMENT;
    let mut attributes = vec![
        KeyValue::new("db.system.name", "postgresql"),
        KeyValue::new("db.operation.name", operation),
        KeyValue::new("db.operation.batch.size", calls.len() as i64),
    ];
    if let Some(collection) = collection {
        attributes.push(KeyValue::new("db.collection.name", collection));
    }
    let links = calls
        .iter()
        .flatten()
        .map(|call| call.span().span_context().clone())
        .filter(|call| call.is_valid())
        .map(Link::with_context)
        .collect();
    let span = tracer
        .span_builder(B::NAME)
        .with_kind(SpanKind::Client)
        .with_attributes(attributes)
        .with_links(links)
        .start_with_context(tracer, &parent);
    let context = parent
        .with_remote_span_context(span.span_context().clone())
        .with_value(InBatch);
    Some((span, context))
}

/// In a trace context, says that statements run in it belong to a batch.
#[derive(Debug)]
pub struct InBatch;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::embedded_pg::{EmbeddedPostgres, Options};
    use crate::store::db::{PoolSettings, build_pool};

    /// Doubles each item; records the size of every batch; fails the whole
    /// batch on an item 0, and never ends on an item 1 (noting when it is
    /// dropped).
    #[derive(Default)]
    struct Doubler {
        sizes: Mutex<Vec<usize>>,
        dropped: Arc<AtomicBool>,
    }

    struct NoteDrop(Arc<AtomicBool>);

    impl Drop for NoteDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Batch for Arc<Doubler> {
        type Item = u32;
        type Output = u32;
        const MAX: usize = 8;
        const POOL_SHARE: usize = 1;
        const NAME: &'static str = "test";
        const STATEMENT: (&'static str, Option<&'static str>) = ("SELECT", None);

        async fn run(
            &self,
            _conn: &mut AsyncPgConnection,
            items: Vec<u32>,
        ) -> Result<Vec<Result<u32, StoreError>>, StoreError> {
            self.sizes.lock().unwrap().push(items.len());
            if items.contains(&0) {
                return Err(StoreError::Unavailable("down".into()));
            }
            if items.contains(&1) {
                let _note = NoteDrop(Arc::clone(&self.dropped));
                std::future::pending::<()>().await;
            }
            Ok(items.into_iter().map(|n| Ok(n * 2)).collect())
        }
    }

    async fn pool(pg: &EmbeddedPostgres) -> DbPool {
        build_pool(
            pg.config("postgres"),
            &PoolSettings {
                max_size: 1,
                connect_timeout: Duration::from_secs(5),
                acquire_timeout: Duration::from_secs(5),
                statement_timeout: Duration::from_secs(5),
            },
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn calls_are_batched_while_they_wait_and_each_gets_its_own_answer() {
        let dir =
            std::env::temp_dir().join(format!("users-service-coalesce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = EmbeddedPostgres::start(
            &dir,
            Options {
                settings: vec![("fsync".into(), "off".into())],
                ..Options::default()
            },
        )
        .await
        .unwrap();
        let pool = pool(&pg).await;
        let batch = Arc::new(Doubler::default());
        let coalescer = Coalescer::new(Arc::clone(&batch), pool.clone(), Histogram::new([1.0]));

        // While the pool's only connection is taken, calls queue; one whose
        // caller leaves before its batch starts is not run.
        let held = pool.get().await.unwrap();
        let early_leaver = {
            let coalescer = Arc::clone(&coalescer);
            tokio::time::timeout(Duration::from_millis(50), async move {
                coalescer.submit(100).await
            })
        };
        assert!(early_leaver.await.is_err());
        let calls: Vec<_> = (2..7)
            .map(|n| {
                let coalescer = Arc::clone(&coalescer);
                tokio::spawn(async move { coalescer.submit(n).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        for (n, call) in (2..7).zip(calls) {
            assert_eq!(call.await.unwrap(), Ok(n * 2));
        }
        assert_eq!(
            *batch.sizes.lock().unwrap(),
            [5],
            "one batch, without the leaver"
        );

        // A failure of the whole batch reaches each of its callers.
        let held = pool.get().await.unwrap();
        let failing: Vec<_> = [0, 7]
            .into_iter()
            .map(|n| {
                let coalescer = Arc::clone(&coalescer);
                tokio::spawn(async move { coalescer.submit(n).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        for call in failing {
            assert_eq!(
                call.await.unwrap(),
                Err(StoreError::Unavailable("down".into()))
            );
        }

        // A running batch whose callers have all left is dropped.
        let stuck = tokio::time::timeout(Duration::from_millis(200), coalescer.submit(1)).await;
        assert!(stuck.is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(batch.dropped.load(Ordering::SeqCst));
        // Its connection was closed, not returned busy: the next call runs.
        assert_eq!(coalescer.submit(8).await, Ok(16));

        drop(coalescer);
        pool.close();
        pg.stop().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
