//! Outputs and errors of the [`DeferredList`](super::DeferredList) futures
//! that can resolve before every future in the list has finished.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_core::TryFuture;

use super::collect::{debug_state, unresolved, Collect};

/// The other futures of a list that fired early, finished or still running.
///
/// [`FirstSuccess`] and [`FirstError`] carry one. It contains every future of
/// the list except the one that fired it: the outcomes of those that had
/// already finished, and the futures still running with their input indices.
///
/// # Work still running when it fires early
///
/// Twisted never cancels such work, so it keeps running after the list has
/// fired. Here the caller chooses, with the `Rest`:
///
/// - **Drop it to cancel the work.** Every future still running is dropped at
///   once, stops at the `.await` it had reached and runs its own drop code.
/// - **Await it to let the work finish.** It resolves once every future has
///   finished, with the outcome of each future except the one that fired,
///   as `(index, outcome)` pairs in input order. Those that had finished before
///   the list fired are included.
/// - **Spawn it to let the work finish in the background.** With the `tokio`
///   feature, `Rest::spawn` moves it onto a tokio task and returns the task's
///   `JoinHandle`.
///
/// Until it is awaited or spawned, nothing polls its futures, so they make no
/// progress.
///
/// # Cancel safety
///
/// Dropping it drops every future still running, as described above, and the
/// outcomes collected so far.
///
/// # Panics
///
/// Polling it again after it resolved panics.
///
/// # Examples
///
/// Keep the first answer, then wait for the others to log their outcomes:
///
/// ```
/// use deferred_semaphore::DeferredList;
/// use std::future::ready;
/// # futures::executor::block_on(async {
///
/// let list = DeferredList::new([ready(Err("refused")), ready(Ok(1)), ready(Ok(2))]);
/// let first = list.fire_on_one_callback().await?;
///
/// let others = first.rest.await;
/// assert_eq!(others.len(), 2);
/// assert!(others.iter().all(|(index, _)| *index != first.index));
/// # Ok::<(), deferred_semaphore::FireError<&str>>(())
/// # }).unwrap();
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct Rest<Fut: TryFuture> {
    state: Option<Collect<Fut>>,
}

impl<Fut: TryFuture> fmt::Debug for Rest<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_state(f, "Rest", &self.state)
    }
}

impl<Fut: TryFuture> Rest<Fut> {
    pub(super) fn new(collect: Collect<Fut>) -> Self {
        Self {
            state: Some(collect),
        }
    }

    /// Returns the number of futures that have not finished yet.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::gather_results;
    /// use std::future::pending;
    /// # futures::executor::block_on(async {
    ///
    /// let checks = (0..3).map(|disk| async move {
    ///     if disk == 0 {
    ///         return Err("disk 0 is full");
    ///     }
    ///     pending::<()>().await;
    ///     Ok(())
    /// });
    /// let error = gather_results(checks).await.unwrap_err();
    /// assert_eq!(error.rest.running(), 2);
    /// # });
    /// ```
    pub fn running(&self) -> usize {
        self.state.as_ref().map_or(0, Collect::running)
    }
}

#[cfg(feature = "tokio")]
impl<Fut> Rest<Fut>
where
    Fut: TryFuture + Send + 'static,
    Fut::Ok: Send + 'static,
    Fut::Error: Send + 'static,
{
    /// Spawns the remaining work onto a tokio task so it finishes unattended.
    ///
    /// Awaiting the returned handle gives what awaiting the `Rest` gives.
    /// Dropping the handle detaches the task, which keeps running.
    ///
    /// Requires the `tokio` feature.
    ///
    /// # Panics
    ///
    /// Panics when called outside a tokio runtime, as `tokio::spawn` does.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::gather_results;
    /// use std::future::ready;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    ///
    /// let error = gather_results([ready(Err("offline")), ready(Ok(7))]).await.unwrap_err();
    /// let others = error.rest.spawn().await.unwrap();
    /// assert_eq!(others, [(1, Ok(7))]);
    /// # }
    /// ```
    pub fn spawn(self) -> tokio::task::JoinHandle<<Self as Future>::Output> {
        tokio::spawn(self)
    }
}

impl<Fut: TryFuture> Future for Rest<Fut> {
    type Output = Vec<(usize, Result<Fut::Ok, Fut::Error>)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        ready!(unresolved(&mut this.state, "Rest").poll_all(cx));
        Poll::Ready(
            this.state
                .take()
                .map(Collect::into_stored)
                .unwrap_or_default(),
        )
    }
}

/// The first success of a list, with its input index and the other futures.
///
/// Returned by [`DeferredList::fire_on_one_callback`]. Where Twisted fires
/// with the tuple `(value, index)`, this names each part.
///
/// [`DeferredList::fire_on_one_callback`]: super::DeferredList::fire_on_one_callback
///
/// # Examples
///
/// ```
/// use deferred_semaphore::{DeferredList, FirstSuccess};
/// use std::future::ready;
/// # futures::executor::block_on(async {
///
/// let list = DeferredList::new([ready(Err("refused")), ready(Ok("pong"))]);
/// let FirstSuccess { index, value, rest } = list.fire_on_one_callback().await.unwrap();
/// assert_eq!((index, value), (1, "pong"));
/// assert_eq!(rest.await, [(0, Err("refused"))]);
/// # });
/// ```
pub struct FirstSuccess<Fut: TryFuture> {
    /// The input index of the future that succeeded first.
    pub index: usize,
    /// The value it returned.
    pub value: Fut::Ok,
    /// The other futures of the list: drop it to cancel them, or await it.
    pub rest: Rest<Fut>,
}

impl<Fut: TryFuture> fmt::Debug for FirstSuccess<Fut>
where
    Fut::Ok: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirstSuccess")
            .field("index", &self.index)
            .field("value", &self.value)
            .field("rest", &self.rest)
            .finish()
    }
}

/// The first failure of a list, with its input index and the other futures.
///
/// Returned by [`DeferredList::fire_on_one_errback`] and [`gather_results`].
/// Unlike Twisted's `FirstError`, it contains the original error itself rather
/// than a failure to unwrap, and [`Error::source`] returns that error.
///
/// [`DeferredList::fire_on_one_errback`]: super::DeferredList::fire_on_one_errback
/// [`gather_results`]: super::gather_results
///
/// # Examples
///
/// ```
/// use deferred_semaphore::gather_results;
/// use std::future::ready;
/// # futures::executor::block_on(async {
///
/// let pages = [ready(Ok::<&str, &str>("page 1")), ready(Err("HTTP 503"))];
/// let error = gather_results(pages).await.unwrap_err();
/// assert_eq!(error.to_string(), "future at index 1 failed");
/// assert_eq!(error.into_inner(), "HTTP 503");
/// # });
/// ```
pub struct FirstError<Fut: TryFuture> {
    /// The input index of the future that failed first.
    pub index: usize,
    /// The error it returned.
    pub error: Fut::Error,
    /// The other futures of the list: drop it to cancel them, or await it.
    pub rest: Rest<Fut>,
}

impl<Fut: TryFuture> fmt::Debug for FirstError<Fut>
where
    Fut::Error: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirstError")
            .field("index", &self.index)
            .field("error", &self.error)
            .field("rest", &self.rest)
            .finish()
    }
}

impl<Fut: TryFuture> FirstError<Fut> {
    /// Returns the original error, dropping `rest` and so cancelling its work.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{gather_results, FirstError};
    /// use std::future::ready;
    /// # futures::executor::block_on(async {
    ///
    /// let gather = gather_results([ready(Err::<(), _>("quota exceeded"))]);
    /// assert_eq!(gather.await.map_err(FirstError::into_inner), Err("quota exceeded"));
    /// # });
    /// ```
    pub fn into_inner(self) -> Fut::Error {
        self.error
    }
}

impl<Fut: TryFuture> fmt::Display for FirstError<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "future at index {} failed", self.index)
    }
}

impl<Fut: TryFuture> Error for FirstError<Fut>
where
    Fut::Error: Error + 'static,
{
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.error)
    }
}

/// The reason a list waiting for its first success failed.
///
/// Returned by [`DeferredList::fire_on_one_callback`]. Twisted fires with the
/// full list of outcomes when nothing succeeds, and never fires for an empty
/// list. Both cases are errors here.
///
/// [`DeferredList::fire_on_one_callback`]: super::DeferredList::fire_on_one_callback
///
/// # Examples
///
/// ```
/// use deferred_semaphore::{DeferredList, FireError};
/// # use std::future::Ready;
/// # futures::executor::block_on(async {
///
/// let empty = DeferredList::<Ready<Result<(), String>>>::new([]);
/// assert_eq!(empty.fire_on_one_callback().await.unwrap_err(), FireError::Empty);
/// # });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FireError<E> {
    /// The list contains no future, so none can succeed.
    Empty,
    /// Every future failed: each error with its input index, in input order.
    AllFailed(Vec<(usize, E)>),
}

impl<E> FireError<E> {
    // Only failures are stored while a list waits for a success, so every
    // stored outcome is an error.
    pub(super) fn from_failures<T>(stored: Vec<(usize, Result<T, E>)>) -> Self {
        if stored.is_empty() {
            return Self::Empty;
        }
        let errors = stored
            .into_iter()
            .filter_map(|(index, outcome)| Some((index, outcome.err()?)));
        Self::AllFailed(errors.collect())
    }
}

impl<E> fmt::Display for FireError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("list is empty, so no future can succeed"),
            Self::AllFailed(errors) => write!(f, "all {} futures in the list failed", errors.len()),
        }
    }
}

/// The source is the error of the lowest index, as `Error::source` can
/// return only one.
impl<E: Error + 'static> Error for FireError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Empty => None,
            Self::AllFailed(errors) => errors.first().map(|(_, error)| error as &dyn Error),
        }
    }
}
