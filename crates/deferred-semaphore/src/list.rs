//! Waiting for many fallible futures: [`DeferredList`] and [`gather_results`].

mod collect;
mod early;

use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::TryFuture;
use futures_util::FutureExt;

use self::collect::{debug_state, unresolved, Collect};
pub use self::early::{FireError, FirstError, FirstSuccess, Rest};

/// Waits for many fallible futures and returns every outcome in input order.
///
/// This is Twisted's `DeferredList`. It takes the futures out of any
/// [`IntoIterator`] at construction, so later changes to the source have no
/// effect. Awaiting the list polls all of its futures concurrently inside this
/// one future, on the task that awaits it, and resolves once every one has
/// finished. The output contains one `Result` per future at the future's input
/// index, whatever order they finished in. An empty list resolves at once with
/// an empty `Vec`.
///
/// A wake-up polls only the futures whose waker was called, so its cost does
/// not grow with the length of the list.
///
/// Twisted handles Deferreds that already fired while it builds the list.
/// This list polls nothing before it is polled itself, and most Rust futures
/// do no work until then. The list itself never fails: a future that fails is
/// an `Err` at its index.
///
/// | Twisted | here |
/// | --- | --- |
/// | `DeferredList(ds)` | `DeferredList::new(futures).await` |
/// | `(True, value)`, `(False, failure)` | `Ok(value)`, `Err(error)` |
/// | `fireOnOneCallback=True` | [`fire_on_one_callback`](Self::fire_on_one_callback) |
/// | `fireOnOneErrback=True` | [`fire_on_one_errback`](Self::fire_on_one_errback) |
/// | `gatherResults(ds)` | [`gather_results`] |
/// | `consumeErrors=True` | not needed |
/// | `cancel()` | dropping the list |
///
/// `consumeErrors` has no counterpart because errors are plain values here.
/// The list owns each error it collects, and nothing reports an error that
/// nobody looked at as unhandled.
///
/// # Cancel safety
///
/// Dropping the list before it resolves drops every future still in it. Each
/// one stops at the `.await` it had reached and runs its own drop code, so a
/// guard it held is released and a connection it opened is closed. The
/// outcomes collected so far are dropped too. To poll the list in a `select!`
/// loop without losing them, pin it once outside the loop and poll `&mut list`.
///
/// # Panics
///
/// Polling the list again after it resolved panics.
///
/// # Examples
///
/// ## Collect every outcome of a batch
///
/// Send a day's emails concurrently and report the addresses that failed:
///
/// ```
/// use deferred_semaphore::DeferredList;
/// # use std::io;
/// # async fn send_email(to: &str) -> io::Result<()> {
/// #     match to.ends_with(".invalid") {
/// #         true => Err(io::Error::other("unknown domain")),
/// #         false => Ok(()),
/// #     }
/// # }
/// # futures::executor::block_on(async {
///
/// let recipients = ["ann@example.com", "bob@example.invalid", "cy@example.com"];
/// let outcomes = DeferredList::new(recipients.map(send_email)).await;
///
/// let failed: Vec<&str> = recipients
///     .into_iter()
///     .zip(&outcomes)
///     .filter_map(|(to, outcome)| outcome.is_err().then_some(to))
///     .collect();
/// assert_eq!(failed, ["bob@example.invalid"]);
/// # });
/// ```
///
/// ## Take the first mirror that answers
///
/// Ask every mirror at once and keep the first download that succeeds.
/// Dropping `rest` cancels the downloads still running:
///
/// ```
/// use deferred_semaphore::DeferredList;
/// # async fn download(mirror: &str) -> Result<Vec<u8>, String> {
/// #     match mirror.starts_with("eu.") {
/// #         true => Ok(b"release notes".to_vec()),
/// #         false => Err(format!("{mirror}: timed out")),
/// #     }
/// # }
/// # futures::executor::block_on(async {
///
/// let mirrors = ["us.example.org", "eu.example.org", "ap.example.org"];
/// let first = DeferredList::new(mirrors.map(download)).fire_on_one_callback().await?;
/// drop(first.rest);
///
/// assert_eq!(mirrors[first.index], "eu.example.org");
/// assert_eq!(first.value, b"release notes");
/// # Ok::<(), deferred_semaphore::FireError<String>>(())
/// # }).unwrap();
/// ```
///
/// ## Fail fast on the first error
///
/// Load every configuration file, or stop at the first one that fails and
/// name it:
///
/// ```
/// use deferred_semaphore::gather_results;
/// # use std::io;
/// # async fn load(path: &str) -> io::Result<String> {
/// #     match path {
/// #         "b.toml" => Err(io::Error::new(io::ErrorKind::NotFound, "no such file")),
/// #         _ => Ok(format!("contents of {path}")),
/// #     }
/// # }
/// # futures::executor::block_on(async {
///
/// let paths = ["a.toml", "b.toml", "c.toml"];
/// let error = gather_results(paths.map(load)).await.unwrap_err();
///
/// assert_eq!(paths[error.index], "b.toml");
/// assert_eq!(error.error.kind(), io::ErrorKind::NotFound);
/// # });
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct DeferredList<Fut: TryFuture> {
    state: Option<Collect<Fut>>,
}

impl<Fut: TryFuture> fmt::Debug for DeferredList<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_state(f, "DeferredList", &self.state)
    }
}

impl<Fut: TryFuture> DeferredList<Fut> {
    /// Creates a list from `futures`, taking them all out of the iterator now.
    ///
    /// No future is polled until the list is.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredList;
    /// use std::future::ready;
    /// # futures::executor::block_on(async {
    ///
    /// let list = DeferredList::new([ready(Ok::<_, String>(1)), ready(Ok(2))]);
    /// assert_eq!(list.await, [Ok(1), Ok(2)]);
    /// # });
    /// ```
    pub fn new(futures: impl IntoIterator<Item = Fut>) -> Self {
        Self {
            state: Some(Collect::new(futures)),
        }
    }

    /// Returns a future of the first success in time, or of every error.
    ///
    /// This is Twisted's `fireOnOneCallback=True`, with a typed output in
    /// every case. The first future to succeed, in time rather than by index,
    /// resolves it with a [`FirstSuccess`]: the value, its input index and the
    /// [`Rest`] of the list, whose futures you may cancel or let finish. When
    /// every future fails, it resolves with all the errors in input order.
    /// Where Twisted never fires for an empty list, this resolves at once with
    /// an error.
    ///
    /// If the list was polled before this call, a success it already stored
    /// wins, the lowest index first, because the list keeps no record of when
    /// stored outcomes arrived.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future drops every future of the list, as
    /// dropping the list does.
    ///
    /// # Panics
    ///
    /// Panics if the list already resolved.
    ///
    /// # Errors
    ///
    /// - [`FireError::Empty`] when the list contains no future.
    /// - [`FireError::AllFailed`] when every future failed.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::{DeferredList, FireError};
    /// use std::future::ready;
    /// # futures::executor::block_on(async {
    ///
    /// let list = DeferredList::new([ready(Err::<u8, _>("refused")), ready(Err("refused"))]);
    /// let error = list.fire_on_one_callback().await.unwrap_err();
    /// assert_eq!(error, FireError::AllFailed(vec![(0, "refused"), (1, "refused")]));
    /// # });
    /// ```
    pub fn fire_on_one_callback(self) -> FireOnOneCallback<Fut> {
        let mut collect = self.into_unresolved("fire_on_one_callback");
        let stored = collect.take_stored(Result::is_ok);
        let early = stored.and_then(|(index, outcome)| Some((index, outcome.ok()?)));
        FireOnOneCallback {
            state: Some(collect),
            early,
        }
    }

    /// Returns a future of every value in input order, or of the first error.
    ///
    /// This is Twisted's `fireOnOneErrback=True`, and what [`gather_results`]
    /// returns. The first future to fail, in time rather than by index,
    /// resolves it with a [`FirstError`]: the original error, its input index
    /// and the [`Rest`] of the list, whose futures you may cancel or let
    /// finish. An empty list resolves at once with an empty `Vec`.
    ///
    /// If the list was polled before this call, an error it already stored
    /// wins, the lowest index first, because the list keeps no record of when
    /// stored outcomes arrived.
    ///
    /// # Cancel safety
    ///
    /// Dropping the returned future drops every future of the list, as
    /// dropping the list does.
    ///
    /// # Panics
    ///
    /// Panics if the list already resolved.
    ///
    /// # Errors
    ///
    /// Returns a [`FirstError`] when any future fails.
    ///
    /// # Examples
    ///
    /// ```
    /// use deferred_semaphore::DeferredList;
    /// use std::future::ready;
    /// # futures::executor::block_on(async {
    ///
    /// let list = DeferredList::new([ready(Ok::<_, String>("a")), ready(Ok("b"))]);
    /// assert_eq!(list.fire_on_one_errback().await.unwrap(), ["a", "b"]);
    /// # });
    /// ```
    pub fn fire_on_one_errback(self) -> FireOnOneErrback<Fut> {
        let mut collect = self.into_unresolved("fire_on_one_errback");
        let stored = collect.take_stored(Result::is_err);
        let early = stored.and_then(|(index, outcome)| Some((index, outcome.err()?)));
        FireOnOneErrback {
            state: Some(collect),
            early,
        }
    }

    fn into_unresolved(self, method: &str) -> Collect<Fut> {
        match self.state {
            Some(collect) => collect,
            None => panic!("`DeferredList::{method}` called after the list resolved"),
        }
    }
}

impl<Fut: TryFuture> FromIterator<Fut> for DeferredList<Fut> {
    fn from_iter<I: IntoIterator<Item = Fut>>(futures: I) -> Self {
        Self::new(futures)
    }
}

impl<Fut: TryFuture> Future for DeferredList<Fut> {
    type Output = Vec<Result<Fut::Ok, Fut::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let collect = unresolved(&mut this.state, "DeferredList");
        std::task::ready!(collect.poll_all(cx));
        let stored = this
            .state
            .take()
            .map(Collect::into_stored)
            .unwrap_or_default();
        Poll::Ready(stored.into_iter().map(|(_, outcome)| outcome).collect())
    }
}

/// Future of the first success in a [`DeferredList`], or of every error.
///
/// Returned by [`DeferredList::fire_on_one_callback`], which describes the
/// output.
///
/// # Cancel safety
///
/// Dropping this future before it resolves drops every future of the list.
/// Each one stops at the `.await` it had reached and runs its own drop code,
/// and the errors collected so far are dropped too. Once it has resolved, the
/// futures still running belong to [`FirstSuccess::rest`].
///
/// # Panics
///
/// Polling it again after it resolved panics.
///
/// # Examples
///
/// ```
/// use deferred_semaphore::DeferredList;
/// use std::future::ready;
/// # futures::executor::block_on(async {
///
/// let list = DeferredList::new([ready(Err("refused")), ready(Ok(443))]);
/// let first = list.fire_on_one_callback().await.unwrap();
/// assert_eq!((first.index, first.value), (1, 443));
/// # });
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct FireOnOneCallback<Fut: TryFuture> {
    state: Option<Collect<Fut>>,
    // A success stored before the list became this future, fired first.
    early: Option<(usize, Fut::Ok)>,
}

impl<Fut: TryFuture> fmt::Debug for FireOnOneCallback<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_state(f, "FireOnOneCallback", &self.state)
    }
}

// The stored success is moved out, never pinned, so the future is `Unpin`
// whatever the type of the value.
impl<Fut: TryFuture> Unpin for FireOnOneCallback<Fut> {}

impl<Fut: TryFuture> Future for FireOnOneCallback<Fut> {
    type Output = Result<FirstSuccess<Fut>, FireError<Fut::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let collect = unresolved(&mut this.state, "FireOnOneCallback");
        let success = match this.early.take() {
            Some(early) => Some(early),
            None => std::task::ready!(collect.poll_until(cx, break_on_ok)),
        };

        let collect = this.state.take().expect("state was checked above");
        Poll::Ready(match success {
            Some((index, value)) => Ok(FirstSuccess {
                index,
                value,
                rest: Rest::new(collect),
            }),
            None => Err(FireError::from_failures(collect.into_stored())),
        })
    }
}

/// Future of every value in a [`DeferredList`], or of the first error.
///
/// Returned by [`DeferredList::fire_on_one_errback`], which describes the
/// output.
///
/// # Cancel safety
///
/// Dropping this future before it resolves drops every future of the list.
/// Each one stops at the `.await` it had reached and runs its own drop code,
/// and the values collected so far are dropped too. Once it has failed, the
/// futures still running belong to [`FirstError::rest`].
///
/// # Panics
///
/// Polling it again after it resolved panics.
///
/// # Examples
///
/// ```
/// use deferred_semaphore::DeferredList;
/// use std::future::ready;
/// # futures::executor::block_on(async {
///
/// let list = DeferredList::new([ready(Ok(1)), ready(Err("disk full"))]);
/// let error = list.fire_on_one_errback().await.unwrap_err();
/// assert_eq!((error.index, error.error), (1, "disk full"));
/// # });
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct FireOnOneErrback<Fut: TryFuture> {
    state: Option<Collect<Fut>>,
    // An error stored before the list became this future, fired first.
    early: Option<(usize, Fut::Error)>,
}

impl<Fut: TryFuture> fmt::Debug for FireOnOneErrback<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_state(f, "FireOnOneErrback", &self.state)
    }
}

// The stored error is moved out, never pinned, so the future is `Unpin`
// whatever the type of the error.
impl<Fut: TryFuture> Unpin for FireOnOneErrback<Fut> {}

impl<Fut: TryFuture> Future for FireOnOneErrback<Fut> {
    type Output = Result<Vec<Fut::Ok>, FirstError<Fut>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let collect = unresolved(&mut this.state, "FireOnOneErrback");
        let failure = match this.early.take() {
            Some(early) => Some(early),
            None => std::task::ready!(collect.poll_until(cx, break_on_err)),
        };

        let collect = this.state.take().expect("state was checked above");
        Poll::Ready(match failure {
            Some((index, error)) => Err(FirstError {
                index,
                error,
                rest: Rest::new(collect),
            }),
            None => Ok(successes(collect)),
        })
    }
}

/// Waits for many fallible futures and returns their values, or the first error.
///
/// This is Twisted's `gatherResults`, and the same as
/// [`DeferredList::fire_on_one_errback`]. Values come back in input order. The
/// first future to fail, in time rather than by index, resolves it with a
/// [`FirstError`] that contains the original error and its index directly, where
/// Twisted makes the caller unwrap a `subFailure`. The futures still running
/// then are in [`FirstError::rest`], to cancel or to let finish. An empty
/// input resolves at once with an empty `Vec`.
///
/// # Cancel safety
///
/// Dropping the returned future drops every future given to it.
///
/// # Errors
///
/// Resolves with a [`FirstError`] when any future fails.
///
/// # Examples
///
/// ```
/// use deferred_semaphore::{gather_results, FirstError};
/// use std::future::ready;
/// # futures::executor::block_on(async {
///
/// let sizes = gather_results([ready(Ok::<u64, String>(512)), ready(Ok(2048))]).await;
/// assert_eq!(sizes.map_err(FirstError::into_inner), Ok(vec![512, 2048]));
/// # });
/// ```
pub fn gather_results<Fut: TryFuture>(futures: impl IntoIterator<Item = Fut>) -> Gather<Fut> {
    Gather {
        inner: DeferredList::new(futures).fire_on_one_errback(),
    }
}

/// Future of every value of many futures, or of the first error.
///
/// Returned by [`gather_results`], which describes the output.
///
/// # Cancel safety
///
/// Dropping this future before it resolves drops every future given to
/// [`gather_results`]. Each one stops at the `.await` it had reached and runs
/// its own drop code, and the values collected so far are dropped too. Once it
/// has failed, the futures still running belong to [`FirstError::rest`].
///
/// # Panics
///
/// Polling it again after it resolved panics.
///
/// # Examples
///
/// ```
/// use deferred_semaphore::gather_results;
/// use std::future::ready;
/// # futures::executor::block_on(async {
///
/// let gather = gather_results([ready(Ok::<_, String>('a')), ready(Ok('b'))]);
/// assert_eq!(gather.await.unwrap(), ['a', 'b']);
/// # });
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct Gather<Fut: TryFuture> {
    inner: FireOnOneErrback<Fut>,
}

impl<Fut: TryFuture> fmt::Debug for Gather<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_state(f, "Gather", &self.inner.state)
    }
}

impl<Fut: TryFuture> Future for Gather<Fut> {
    type Output = Result<Vec<Fut::Ok>, FirstError<Fut>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.poll_unpin(cx)
    }
}

fn break_on_ok<T, E>(outcome: Result<T, E>) -> ControlFlow<T, Result<T, E>> {
    match outcome {
        Ok(value) => ControlFlow::Break(value),
        Err(error) => ControlFlow::Continue(Err(error)),
    }
}

fn break_on_err<T, E>(outcome: Result<T, E>) -> ControlFlow<E, Result<T, E>> {
    match outcome {
        Ok(value) => ControlFlow::Continue(Ok(value)),
        Err(error) => ControlFlow::Break(error),
    }
}

// Only successes are stored when no failure broke the wait, so every stored
// outcome is `Ok`.
fn successes<Fut: TryFuture>(collect: Collect<Fut>) -> Vec<Fut::Ok> {
    let stored = collect.into_stored().into_iter();
    stored.filter_map(|(_, outcome)| outcome.ok()).collect()
}
