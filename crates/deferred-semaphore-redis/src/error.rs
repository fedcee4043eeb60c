//! The error type and the split of Redis errors into "unreachable, try
//! again" and "failed".

use std::time::Duration;

/// An error of a limiter call: a permit could not be granted, or a limit
/// could not be read or set.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Redis could not be reached for longer than
    /// [`Options::unavailable_after`](crate::Options::unavailable_after).
    Unavailable {
        /// The Redis URL with any password hidden.
        url: String,
        /// How long the limiter kept trying.
        waited: Duration,
        /// The error of the last try.
        last_error: String,
    },
    /// The namespace has no global limit stored in Redis.
    NoLimit {
        /// The namespace without a limit.
        namespace: String,
    },
    /// The URL, namespace, key or option is not valid.
    Config(String),
    /// Redis returned an error.
    Redis(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable {
                url,
                waited,
                last_error,
            } => write!(
                f,
                "Redis at {url} could not be reached for {:.1} s (last error: {last_error}); \
                 no permit is granted while Redis is unreachable, so check that the server \
                 runs and accepts connections, or raise Options::unavailable_after",
                waited.as_secs_f64()
            ),
            Self::NoLimit { namespace } => write!(
                f,
                "limiter namespace {namespace:?} has no global limit stored in Redis; \
                 set one with `backlog limits redis://HOST:PORT/{namespace} --global N`"
            ),
            Self::Config(message) => f.write_str(message),
            Self::Redis(message) => write!(f, "Redis returned an error: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// A failed round trip, sorted by what the caller should do next.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No reply: the server is down, paused, unreachable or still loading.
    /// The caller retries until its patience runs out.
    Unreachable(String),
    /// The server replied with an error that a retry does not fix.
    Failed(String),
}

impl CallError {
    pub(crate) fn timed_out(after: Duration) -> Self {
        Self::Unreachable(format!("no reply within {} ms", after.as_millis()))
    }

    pub(crate) fn into_error(self) -> Error {
        match self {
            Self::Unreachable(message) | Self::Failed(message) => Error::Redis(message),
        }
    }
}

impl From<CallError> for Error {
    fn from(error: CallError) -> Self {
        error.into_error()
    }
}

impl From<redis::RedisError> for CallError {
    fn from(error: redis::RedisError) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        let message = error.to_string();
        match error.kind() {
            ErrorKind::Server(ServerErrorKind::ResponseError)
            | ErrorKind::Server(ServerErrorKind::NoPerm)
            | ErrorKind::Server(ServerErrorKind::CrossSlot)
            | ErrorKind::AuthenticationFailed
            | ErrorKind::InvalidClientConfig
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Parse => Self::Failed(message),
            _ => Self::Unreachable(message),
        }
    }
}

/// Returns `url` with the password, if any, replaced by `****`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.find(':') {
        Some(colon) => format!("{}:****", &userinfo[..colon]),
        None => userinfo.to_owned(),
    };
    format!("{}{}{}", &url[..scheme_end + 3], shown, &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_password() {
        assert_eq!(
            redact_url("redis://user:secret@host:6000/x"),
            "redis://user:****@host:6000/x"
        );
        assert_eq!(
            redact_url("redis://:secret@host:6000"),
            "redis://:****@host:6000"
        );
        assert_eq!(
            redact_url("redis://user@host:6000"),
            "redis://user@host:6000"
        );
        assert_eq!(redact_url("redis://host:6000"), "redis://host:6000");
    }

    #[test]
    fn no_limit_message_names_fix() {
        let text = Error::NoLimit {
            namespace: "smtp".into(),
        }
        .to_string();
        assert!(text.contains("\"smtp\""), "{text}");
        assert!(
            text.contains("backlog limits redis://HOST:PORT/smtp --global N"),
            "{text}"
        );
    }
}
