//! Eager spawning on tokio, behind the `tokio` feature.

use std::future::Future;

use tokio::task::JoinHandle;

use crate::error::AcquireError;
use crate::semaphore::DeferredSemaphore;

impl DeferredSemaphore {
    /// Spawns a task that calls `work` once a token is free, as Twisted's
    /// `run` starts work whether or not anyone waits for its result.
    ///
    /// The task keeps its token until the work's future really ends, even if
    /// the returned handle is dropped, so the limit holds for detached work
    /// too. Aborting the handle drops the work and only then frees the token.
    ///
    /// Must be called from inside a tokio runtime.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned [`JoinHandle`] detaches the task; it still runs
    /// to completion under the limit.
    ///
    /// # Panics
    ///
    /// Panics if called outside a tokio runtime.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredSemaphore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let sem = DeferredSemaphore::new(2);
    /// let handles: Vec<_> = (1..=4u64)
    ///     .map(|n| sem.spawn(move || async move { n * n }))
    ///     .collect();
    /// let mut squares = Vec::new();
    /// for handle in handles {
    ///     squares.push(handle.await.unwrap().unwrap());
    /// }
    /// assert_eq!(squares, [1, 4, 9, 16]);
    /// # }
    /// ```
    pub fn spawn<F, Fut>(&self, work: F) -> JoinHandle<Result<Fut::Output, AcquireError>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let acquire = self.acquire_owned();
        tokio::spawn(async move {
            let permit = acquire.await?;
            let output = work().await;
            drop(permit);
            Ok(output)
        })
    }
}
