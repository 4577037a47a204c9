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
//! Once a batch has started it runs to its end: its result is other callers'
//! too, so an abandoned call's write may still be stored.

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use diesel_async::AsyncPgConnection;
use tokio::sync::{Semaphore, oneshot};

use prometheus_client::metrics::histogram::Histogram;

use super::db::DbPool;
use crate::{error::Error, metrics::Metrics};

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
    /// The batch's label in metrics.
    const NAME: &'static str;

    /// Runs `items` on `conn`: one result per item, in the same order, or one
    /// error for the whole batch.
    fn run(
        &self,
        conn: &mut AsyncPgConnection,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Result<Vec<Result<Self::Output, Error>>, Error>> + Send;
}

type Reply<B> = oneshot::Sender<Result<<B as Batch>::Output, Error>>;

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
    waiting: Vec<(B::Item, Reply<B>)>,
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
    pub fn new(batch: B, pool: DbPool, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self {
            batch,
            items: metrics.batch_items(B::NAME),
            running: Semaphore::new((pool.status().max_size / B::POOL_SHARE).max(1)),
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                leading: false,
            }),
            pool,
        })
    }

    /// Runs `item` in the next batch and returns its result.
    pub async fn submit(self: &Arc<Self>, item: B::Item) -> Result<B::Output, Error> {
        let (reply, result) = oneshot::channel();
        let lead = {
            let mut queue = self.queue.lock().expect("batch queue lock");
            queue.waiting.push((item, reply));
            !std::mem::replace(&mut queue.leading, true)
        };
        if lead {
            Arc::clone(self).start_leader();
        }
        result
            .await
            .unwrap_or_else(|_| Err(Error::Internal("a batch ended without an answer".into())))
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
        let connection = self.pool.get().await;
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
        let (items, replies): (Vec<_>, Vec<_>) = taken
            .into_iter()
            .filter(|(_, reply)| !reply.is_closed())
            .unzip();
        if items.is_empty() {
            return;
        }
        self.items.observe(items.len() as f64);
        let outcome = match connection {
            Ok(mut connection) => self.batch.run(&mut connection, items).await,
            Err(error) => Err(error.into()),
        };
        match outcome {
            Ok(results) => {
                debug_assert_eq!(results.len(), replies.len());
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.duplicate()));
                }
            }
        }
    }
}
