//! W1 and W2: acquire and release cycles on each semaphore.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use deferred_semaphore::DeferredSemaphore;

/// Tasks that share the cycles of W2.
const W2_TASKS: u64 = 1_000;
/// The limit of W2.
const W2_LIMIT: usize = 8;

/// The semaphore and acquire method a case measures.
#[derive(Debug, Clone, Copy)]
pub enum SemaphoreKind {
    DeferredAcquire,
    DeferredAcquireOwned,
    TokioAcquire,
    TokioAcquireOwned,
    AsyncLockAcquire,
    AsyncLockAcquireArc,
}

impl FromStr for SemaphoreKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "deferred-acquire" => Ok(SemaphoreKind::DeferredAcquire),
            "deferred-acquire-owned" => Ok(SemaphoreKind::DeferredAcquireOwned),
            "tokio-acquire" => Ok(SemaphoreKind::TokioAcquire),
            "tokio-acquire-owned" => Ok(SemaphoreKind::TokioAcquireOwned),
            "async-lock-acquire" => Ok(SemaphoreKind::AsyncLockAcquire),
            "async-lock-acquire-arc" => Ok(SemaphoreKind::AsyncLockAcquireArc),
            _ => Err(format!("unknown implementation {name:?} for W1 and W2")),
        }
    }
}

/// One way to take a permit from a semaphore, so that W1 and W2 are written
/// once for all of them.
trait Acquirer: Clone + Send + Sync + 'static {
    type Permit<'a>: Send
    where
        Self: 'a;

    fn acquire(&self) -> impl Future<Output = Self::Permit<'_>> + Send + '_;
}

#[derive(Clone)]
struct DeferredBorrowed(DeferredSemaphore);

impl Acquirer for DeferredBorrowed {
    type Permit<'a> = deferred_semaphore::Permit<'a>;

    async fn acquire(&self) -> Self::Permit<'_> {
        self.0
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }
}

#[derive(Clone)]
struct DeferredOwned(DeferredSemaphore);

impl Acquirer for DeferredOwned {
    type Permit<'a> = deferred_semaphore::OwnedPermit;

    async fn acquire(&self) -> Self::Permit<'_> {
        let acquire = self.0.acquire_owned();
        acquire.await.expect("the semaphore is never closed")
    }
}

#[derive(Clone)]
struct TokioBorrowed(Arc<tokio::sync::Semaphore>);

impl Acquirer for TokioBorrowed {
    type Permit<'a> = tokio::sync::SemaphorePermit<'a>;

    async fn acquire(&self) -> Self::Permit<'_> {
        self.0
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }
}

#[derive(Clone)]
struct TokioOwned(Arc<tokio::sync::Semaphore>);

impl Acquirer for TokioOwned {
    type Permit<'a> = tokio::sync::OwnedSemaphorePermit;

    async fn acquire(&self) -> Self::Permit<'_> {
        let acquire = Arc::clone(&self.0).acquire_owned();
        acquire.await.expect("the semaphore is never closed")
    }
}

#[derive(Clone)]
struct AsyncLockBorrowed(Arc<async_lock::Semaphore>);

impl Acquirer for AsyncLockBorrowed {
    type Permit<'a> = async_lock::SemaphoreGuard<'a>;

    async fn acquire(&self) -> Self::Permit<'_> {
        self.0.acquire().await
    }
}

#[derive(Clone)]
struct AsyncLockArc(Arc<async_lock::Semaphore>);

impl Acquirer for AsyncLockArc {
    type Permit<'a> = async_lock::SemaphoreGuardArc;

    async fn acquire(&self) -> Self::Permit<'_> {
        self.0.acquire_arc().await
    }
}

/// Builds the semaphore of `kind` with `limit` and passes it to `body`.
macro_rules! with_acquirer {
    ($kind:expr, $limit:expr, $body:ident($($arg:expr),*)) => {
        match $kind {
            SemaphoreKind::DeferredAcquire => {
                $body(DeferredBorrowed(DeferredSemaphore::new($limit)) $(, $arg)*).await
            }
            SemaphoreKind::DeferredAcquireOwned => {
                $body(DeferredOwned(DeferredSemaphore::new($limit)) $(, $arg)*).await
            }
            SemaphoreKind::TokioAcquire => {
                let sem = Arc::new(tokio::sync::Semaphore::new($limit));
                $body(TokioBorrowed(sem) $(, $arg)*).await
            }
            SemaphoreKind::TokioAcquireOwned => {
                let sem = Arc::new(tokio::sync::Semaphore::new($limit));
                $body(TokioOwned(sem) $(, $arg)*).await
            }
            SemaphoreKind::AsyncLockAcquire => {
                let sem = Arc::new(async_lock::Semaphore::new($limit));
                $body(AsyncLockBorrowed(sem) $(, $arg)*).await
            }
            SemaphoreKind::AsyncLockAcquireArc => {
                let sem = Arc::new(async_lock::Semaphore::new($limit));
                $body(AsyncLockArc(sem) $(, $arg)*).await
            }
        }
    };
}

/// W1: one task acquires and releases a limit-1 semaphore `cycles` times.
/// Returns the cycles done.
pub async fn single_task(kind: SemaphoreKind, cycles: u64) -> u64 {
    with_acquirer!(kind, 1, cycle_alone(cycles))
}

async fn cycle_alone<A: Acquirer>(sem: A, cycles: u64) -> u64 {
    let mut done = 0;
    for _ in 0..cycles {
        let permit = sem.acquire().await;
        drop(permit);
        done += 1;
    }
    done
}

/// W2: `W2_TASKS` tasks share `cycles` cycles of acquire, yield, release
/// under a limit of `W2_LIMIT`. Returns the cycles done.
pub async fn many_tasks(kind: SemaphoreKind, cycles: u64) -> u64 {
    with_acquirer!(kind, W2_LIMIT, cycle_together(cycles))
}

async fn cycle_together<A: Acquirer>(sem: A, cycles: u64) -> u64 {
    let per_task = cycles / W2_TASKS;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..W2_TASKS {
        let sem = sem.clone();
        tasks.spawn(async move {
            for _ in 0..per_task {
                let permit = sem.acquire().await;
                tokio::task::yield_now().await;
                drop(permit);
            }
            per_task
        });
    }
    let mut done = 0;
    while let Some(cycles) = tasks.join_next().await {
        done += cycles.expect("a W2 task panicked");
    }
    done
}
