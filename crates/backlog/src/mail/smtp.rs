//! SMTP delivery of one envelope per session, with every recipient's
//! reply: the `--smtp` URL, the runner and the jobs it runs.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::Error as SmtpError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::domains::DomainLimits;
use super::message::Envelope;
use crate::exec::{Gauge, ItemResult, MakeJob, RecipientReply, Runner};
use crate::group::Termination;
use crate::source::{Item, ItemKind};

/// The environment variable with the SMTP user name.
pub const USERNAME_VARIABLE: &str = "BACKLOG_SMTP_USERNAME";
/// The environment variable with the SMTP password.
pub const PASSWORD_VARIABLE: &str = "BACKLOG_SMTP_PASSWORD";

/// The reply code that makes a domain slow down besides a refused
/// connection: "service not available, closing transmission channel".
const SLOW_DOWN_CODE: u16 = 421;

/// The TLS mode of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `smtp://`: STARTTLS when the server offers it, plain text otherwise.
    Opportunistic,
    /// `smtp://...?starttls=required`: STARTTLS or no session.
    Required,
    /// `smtp://...?starttls=never`: plain text only.
    Never,
    /// `smtps://`: TLS from the first byte.
    Implicit,
}

/// The server of `--smtp` and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpServer {
    /// The host name or address.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The TLS mode.
    pub tls: TlsMode,
    /// The user name and password from the environment, if set.
    pub credentials: Option<(String, String)>,
    /// The DER certificates of `--smtp-ca`, trusted as roots besides the
    /// bundled Mozilla roots.
    pub extra_roots: Vec<Vec<u8>>,
}

impl SmtpServer {
    /// Builds the TLS settings of a session: the server's host name to
    /// check and the roots to trust.
    fn tls_parameters(&self) -> Result<TlsParameters, SmtpError> {
        let mut builder = TlsParameters::builder(self.host.clone());
        for der in &self.extra_roots {
            builder = builder.add_root_certificate(Certificate::from_der(der.clone())?);
        }
        builder.build()
    }

    /// Reads the PEM file of `--smtp-ca` into `extra_roots`.
    ///
    /// # Errors
    ///
    /// Fails, naming the file, when it cannot be read, is not valid PEM,
    /// contains no certificate or contains a certificate that is not a
    /// valid root.
    pub fn trust_roots_from(&mut self, path: &Path) -> Result<(), String> {
        let file = path.display();
        let pem = std::fs::read(path).map_err(|error| format!("cannot read {file}: {error}"))?;
        let roots = CertificateDer::pem_slice_iter(&pem)
            .map(|der| der.map(|der| der.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("{file} is not a valid PEM file: {error}"))?;
        if roots.is_empty() {
            return Err(format!(
                "{file} contains no certificate: expected PEM blocks that start with \
                 -----BEGIN CERTIFICATE-----"
            ));
        }
        self.extra_roots = roots;
        // Building the TLS settings once checks every certificate now, not
        // at the first session.
        self.tls_parameters()
            .map_err(|error| format!("{file} contains an invalid certificate: {error}"))?;
        Ok(())
    }
}

/// Parses `--smtp`: `smtp://host[:port][?starttls=required|never]` (port
/// 25 by default) or `smtps://host[:port]` (port 465 by default).
/// Credentials come only from `variable`, never from the URL.
///
/// # Errors
///
/// Fails on another scheme, a missing host, unknown parameters and
/// credentials in the URL.
pub fn parse_smtp_url(
    text: &str,
    variable: impl Fn(&str) -> Option<String>,
) -> Result<SmtpServer, String> {
    let url = url::Url::parse(text).map_err(|error| {
        let shown = without_credentials(text);
        format!("invalid URL '{shown}': {error}")
    })?;
    if url.password().is_some() || !url.username().is_empty() {
        return Err(format!(
            "the URL must not contain a user name or password, which would show in the process \
             list and shell history; set {USERNAME_VARIABLE} and {PASSWORD_VARIABLE} instead"
        ));
    }
    let (mut tls, default_port) = match url.scheme() {
        "smtp" => (TlsMode::Opportunistic, 25),
        "smtps" => (TlsMode::Implicit, 465),
        other => {
            return Err(format!(
                "unknown scheme '{other}': use smtp://host:port or smtps://host:port"
            ))
        }
    };
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| format!("no host in '{text}'"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    for (name, value) in url.query_pairs() {
        tls = match (name.as_ref(), value.as_ref(), tls) {
            ("starttls", "required", TlsMode::Opportunistic) => TlsMode::Required,
            ("starttls", "never", TlsMode::Opportunistic) => TlsMode::Never,
            ("starttls", "opportunistic", TlsMode::Opportunistic) => TlsMode::Opportunistic,
            ("starttls", _, TlsMode::Implicit) => {
                return Err("starttls does not apply to smtps://, which uses TLS throughout".into())
            }
            ("starttls", other, _) => {
                return Err(format!(
                    "starttls must be required, opportunistic or never (got '{other}')"
                ))
            }
            (other, _, _) => return Err(format!("unknown URL parameter '{other}'")),
        };
    }
    if url.path() != "" && url.path() != "/" {
        return Err(format!("unexpected path '{}' in '{text}'", url.path()));
    }
    let credentials = match (variable(USERNAME_VARIABLE), variable(PASSWORD_VARIABLE)) {
        (Some(user), Some(password)) => Some((user, password)),
        (None, None) => None,
        _ => {
            return Err(format!(
                "set both {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}, or neither"
            ))
        }
    };
    Ok(SmtpServer {
        host,
        port: url.port().unwrap_or(default_port),
        tls,
        credentials,
        extra_roots: Vec::new(),
    })
}

/// One attempt's work: the envelope and every recipient's last reply,
/// shared by the attempts so that a retry sends only to the recipients
/// whose last reply was temporary.
#[derive(Debug, Clone)]
pub struct MailJob {
    envelope: Arc<Envelope>,
    replies: Arc<Mutex<Vec<RecipientReply>>>,
}

/// Makes the jobs of `backlog mail`.
#[derive(Debug, Default)]
pub struct MailJobs;

impl MakeJob for MailJobs {
    type Job = MailJob;

    fn job_for(&self, item: &Item) -> Result<MailJob, String> {
        match &item.kind {
            ItemKind::Mail(envelope) => {
                let replies = envelope
                    .recipients
                    .iter()
                    .map(|address| RecipientReply {
                        address: address.to_string(),
                        code: None,
                        message: "not attempted".to_owned(),
                    })
                    .collect();
                Ok(MailJob {
                    envelope: Arc::clone(envelope),
                    replies: Arc::new(Mutex::new(replies)),
                })
            }
            ItemKind::Unsendable { reason, .. } | ItemKind::Malformed { reason, .. } => {
                Err(reason.clone())
            }
            ItemKind::Text(_) | ItemKind::Json(_) => Err("not an email".to_owned()),
        }
    }
}

impl MailJob {
    fn replies(&self) -> std::sync::MutexGuard<'_, Vec<RecipientReply>> {
        self.replies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn snapshot(&self) -> Vec<RecipientReply> {
        self.replies().clone()
    }
}

/// Delivers envelopes over SMTP, one session each, at most `--per-domain`
/// sessions at once per recipient domain.
#[derive(Debug)]
pub struct SmtpRunner {
    server: SmtpServer,
    domains: DomainLimits,
    gauge: Gauge,
    hello: ClientId,
    io_timeout: Duration,
}

/// A failure that ends a session: every recipient still waiting gets it.
#[derive(Debug)]
struct SessionFailure {
    code: Option<u16>,
    message: String,
    refused: bool,
}

impl SmtpRunner {
    /// Creates a runner for `server` under `domains`. Each network read or
    /// write waits at most `io_timeout`.
    pub fn new(server: SmtpServer, domains: DomainLimits, io_timeout: Duration) -> Self {
        SmtpRunner {
            server,
            domains,
            gauge: Gauge::default(),
            hello: ClientId::default(),
            io_timeout,
        }
    }

    /// Runs one session for the recipients of `envelope` in `pending`, and
    /// returns each one's reply.
    async fn session(&self, envelope: &Envelope, pending: &[lettre::Address]) -> Vec<Reply> {
        let mut connection = match self.open().await {
            Ok(connection) => connection,
            Err(failure) => return pending.iter().map(|a| Reply::failed(a, &failure)).collect(),
        };
        let replies = self.transact(&mut connection, envelope, pending).await;
        // The replies are known; a failed QUIT changes none of them.
        let _ = connection.quit().await;
        replies
    }

    async fn open(&self) -> Result<AsyncSmtpConnection, SessionFailure> {
        let server = &self.server;
        let tls_parameters = || {
            server.tls_parameters().map_err(|error| SessionFailure {
                code: None,
                message: format!("cannot set up TLS: {error}"),
                refused: false,
            })
        };
        let implicit = match server.tls {
            TlsMode::Implicit => Some(tls_parameters()?),
            _ => None,
        };
        let mut connection = AsyncSmtpConnection::connect_tokio1(
            (server.host.as_str(), server.port),
            Some(self.io_timeout),
            &self.hello,
            implicit,
            None,
        )
        .await
        .map_err(|error| session_failure(&error))?;
        let starttls = match server.tls {
            TlsMode::Opportunistic => connection.can_starttls(),
            TlsMode::Required => {
                if !connection.can_starttls() {
                    return Err(SessionFailure {
                        code: None,
                        message: "the server does not offer STARTTLS, which starttls=required \
                                  demands"
                            .to_owned(),
                        refused: false,
                    });
                }
                true
            }
            TlsMode::Never | TlsMode::Implicit => false,
        };
        if starttls {
            connection
                .starttls(tls_parameters()?, &self.hello)
                .await
                .map_err(|error| {
                    let mut failure = session_failure(&error);
                    failure.message = format!("STARTTLS failed: {}", failure.message);
                    failure
                })?;
        }
        if let Some((user, password)) = &server.credentials {
            let credentials = Credentials::new(user.clone(), password.clone());
            connection
                .auth(&[Mechanism::Plain, Mechanism::Login], &credentials)
                .await
                .map_err(|error| session_failure(&error))?;
        }
        Ok(connection)
    }

    async fn transact(
        &self,
        connection: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        pending: &[lettre::Address],
    ) -> Vec<Reply> {
        let info = connection.server_info();
        let mut parameters = Vec::new();
        if !envelope.data.is_ascii() && info.supports_feature(Extension::EightBitMime) {
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let non_ascii = std::iter::once(&envelope.sender)
            .chain(pending)
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii && info.supports_feature(Extension::SmtpUtfEight) {
            parameters.push(MailParameter::SmtpUtfEight);
        }
        let mail = Mail::new(Some(envelope.sender.clone()), parameters);
        if let Err(error) = connection.command(mail).await {
            let failure = session_failure(&error);
            return pending.iter().map(|a| Reply::failed(a, &failure)).collect();
        }
        let mut replies = Vec::with_capacity(pending.len());
        let mut accepted = Vec::new();
        for (index, address) in pending.iter().enumerate() {
            match connection.command(Rcpt::new(address.clone(), vec![])).await {
                Ok(_) => accepted.push(index),
                Err(error) => {
                    let failure = session_failure(&error);
                    replies.push(Some(Reply::failed(address, &failure)));
                    if failure.code.is_none() {
                        // The connection broke, so no recipient gets the message.
                        replies.resize_with(pending.len(), || None);
                        return fill(pending, replies, &failure);
                    }
                    continue;
                }
            }
            replies.push(None);
        }
        if accepted.is_empty() {
            return replies.into_iter().flatten().collect();
        }
        let sent = match connection.command(Data).await {
            Ok(_) => connection.message(&envelope.data).await,
            Err(error) => Err(error),
        };
        let outcome = match sent {
            Ok(response) => Reply::from_response(&response),
            Err(error) => {
                let failure = session_failure(&error);
                (failure.code, failure.message, failure.refused)
            }
        };
        for index in accepted {
            replies[index] = Some(Reply {
                address: pending[index].to_string(),
                code: outcome.0,
                message: outcome.1.clone(),
                refused: outcome.2,
            });
        }
        replies.into_iter().flatten().collect()
    }
}

/// Fills the recipients without a reply yet with `failure`.
fn fill(
    pending: &[lettre::Address],
    replies: Vec<Option<Reply>>,
    failure: &SessionFailure,
) -> Vec<Reply> {
    replies
        .into_iter()
        .zip(pending)
        .map(|(reply, address)| reply.unwrap_or_else(|| Reply::failed(address, failure)))
        .collect()
}

/// A recipient's reply within one session.
#[derive(Debug)]
struct Reply {
    address: String,
    code: Option<u16>,
    message: String,
    refused: bool,
}

impl Reply {
    fn failed(address: &lettre::Address, failure: &SessionFailure) -> Self {
        Reply {
            address: address.to_string(),
            code: failure.code,
            message: failure.message.clone(),
            refused: failure.refused,
        }
    }

    fn from_response(response: &Response) -> (Option<u16>, String, bool) {
        let message: Vec<&str> = response.message().collect();
        (Some(response.code().into()), message.join(" "), false)
    }
}

/// Describes an SMTP error: its reply code and text, or the network
/// failure, and whether the connection was refused.
fn session_failure(error: &SmtpError) -> SessionFailure {
    let mut refused = false;
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = cause.source();
    }
    match error.status() {
        Some(code) => SessionFailure {
            code: Some(code.into()),
            message: std::error::Error::source(error)
                .map_or_else(|| error.to_string(), ToString::to_string),
            refused,
        },
        None => SessionFailure {
            code: None,
            message: without_repeated_prefix(error.to_string()),
            refused,
        },
    }
}

/// Removes a repeated first part of an error text: lettre wraps a failed
/// TLS handshake twice, which reads "Connection error: Connection error:
/// invalid peer certificate: UnknownIssuer".
fn without_repeated_prefix(mut text: String) -> String {
    if let Some((first, rest)) = text.split_once(": ") {
        if rest.starts_with(first) && rest[first.len()..].starts_with(": ") {
            text.drain(..first.len() + 2);
        }
    }
    text
}

impl Runner for SmtpRunner {
    type Job = MailJob;

    async fn run(&self, job: MailJob, terminate: impl Future<Output = Termination>) -> ItemResult {
        let started = Instant::now();
        let envelope = &job.envelope;
        let pending: Vec<lettre::Address> = {
            let replies = job.replies();
            envelope
                .recipients
                .iter()
                .zip(replies.iter())
                .filter(|(_, reply)| !reply.is_ok() && reply.is_temporary())
                .map(|(address, _)| address.clone())
                .collect()
        };
        let delivery = async {
            let _domain = self.domains.acquire(&envelope.domain).await;
            let _running = self.gauge.enter();
            self.session(envelope, &pending).await
        };
        let replies = tokio::select! {
            replies = delivery => replies,
            reason = terminate => {
                return ItemResult {
                    terminated: Some(reason),
                    recipients: job.snapshot(),
                    duration: started.elapsed(),
                    ..ItemResult::default()
                };
            }
        };
        if replies
            .iter()
            .any(|reply| reply.refused || reply.code == Some(SLOW_DOWN_CODE))
        {
            self.domains.slow_down(&envelope.domain);
        }
        let recipients = {
            let mut all = job.replies();
            for reply in replies {
                if let Some(slot) = all.iter_mut().find(|r| r.address == reply.address) {
                    slot.code = reply.code;
                    slot.message = reply.message;
                }
            }
            all.clone()
        };
        let temporary = recipients
            .iter()
            .any(|reply| !reply.is_ok() && reply.is_temporary());
        ItemResult {
            recipients,
            temporary,
            duration: started.elapsed(),
            ..ItemResult::default()
        }
    }

    fn gauge(&self) -> &Gauge {
        &self.gauge
    }

    fn what_runs(&self) -> &'static str {
        "SMTP session"
    }
}

/// Returns `text` with anything between `://` and the `@` of its authority
/// replaced by `***`, so that an error never shows a password.
fn without_credentials(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SmtpServer, String> {
        parse_smtp_url(text, |_| None)
    }

    #[test]
    fn invalid_url_error_hides_password() {
        for text in [
            "smtp://u:s3cret@127.0.0.1:99999",
            "smtp://u:s3cret@127.0.0.1:abc",
            "smtp://u:s3cret@[::1",
        ] {
            let error = parse_smtp_url(text, |_| None).unwrap_err();
            assert!(!error.contains("s3cret"), "{error}");
            assert!(error.contains("***@"), "{error}");
        }
    }

    #[test]
    fn parses_schemes_ports_and_starttls() {
        let server = parse("smtp://mail.example.com:587").unwrap();
        assert_eq!(
            (server.host.as_str(), server.port, server.tls),
            ("mail.example.com", 587, TlsMode::Opportunistic)
        );
        assert_eq!(parse("smtp://h").unwrap().port, 25);
        assert_eq!(parse("smtps://h").unwrap().port, 465);
        assert_eq!(parse("smtps://h").unwrap().tls, TlsMode::Implicit);
        let required = parse("smtp://h:587?starttls=required").unwrap();
        assert_eq!(required.tls, TlsMode::Required);
        assert_eq!(
            parse("smtp://h?starttls=never").unwrap().tls,
            TlsMode::Never
        );
        assert_eq!(parse("smtp://[::1]:2525").unwrap().host, "::1");
        assert!(parse("smtps://h?starttls=required").is_err());
        assert!(parse("smtp://h?tls=1")
            .unwrap_err()
            .contains("unknown URL parameter"));
        assert!(parse("http://h").unwrap_err().starts_with("unknown scheme"));
    }

    #[test]
    fn repeated_error_prefix_is_removed() {
        let twice = "Connection error: Connection error: invalid peer certificate".to_owned();
        assert_eq!(
            without_repeated_prefix(twice),
            "Connection error: invalid peer certificate"
        );
        let once = "Connection error: Connection refused".to_owned();
        assert_eq!(without_repeated_prefix(once.clone()), once);
    }

    #[test]
    fn rejects_credentials_in_url() {
        let error = parse("smtp://user:secret@h:587").unwrap_err();
        assert!(error.contains(PASSWORD_VARIABLE), "{error}");
        assert!(!error.contains("secret"), "{error}");
        assert!(parse("smtp://user@h").is_err());
    }

    #[test]
    fn credentials_come_from_both_variables() {
        let both = |name: &str| Some(format!("{name}-value"));
        let server = parse_smtp_url("smtp://h", both).unwrap();
        let (user, _) = server.credentials.unwrap();
        assert_eq!(user, "BACKLOG_SMTP_USERNAME-value");
        let one = |name: &str| (name == USERNAME_VARIABLE).then(|| "u".to_owned());
        assert!(parse_smtp_url("smtp://h", one)
            .unwrap_err()
            .contains("or neither"));
    }
}
