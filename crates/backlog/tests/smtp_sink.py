"""An SMTP sink for the tests of `backlog mail`.

Listens on 127.0.0.1 at a free port, prints `READY <port>` on stdout, and
appends one JSON line per event to the log file given as its argument:

  {"event": "delivered", "mail_from": ..., "rcpt_tos": [...],
   "message_id": ..., "bcc_header": bool, "tls": null or "TLSv1.3",
   "user": null or the authenticated user name, "sessions": N,
   "max_sessions": N, "max_per_domain": {domain: N}}

Every line carries the counts so far: the open sessions, the most seen at
once, and the most seen at once per recipient domain. A session counts for
a domain from its first RCPT of that domain until it closes.

Faults, chosen by a recipient's local part:
  temp-once...  451 on the first RCPT of that address, then 250
  reject...     550 on every RCPT
  busy-once...  421 and a closed connection on the first RCPT, then 250
  drop-once...  the connection is dropped on the first RCPT, then 250
  slow...       the reply to DATA comes after 1 second

Every DATA reply waits --data-delay seconds (0.05 by default), so that
sessions overlap.

TLS and AUTH, off by default:
  --cert FILE --key FILE  the PEM certificate and key of the server
  --tls starttls          offer STARTTLS (--require-starttls: demand it)
  --tls implicit          TLS from the first byte, as on port 465
  --auth USER:PASSWORD    offer AUTH PLAIN and LOGIN after TLS, accepting
                          only this user name and password
"""

import argparse
import asyncio
import json
import socket
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult


class Counts:
    def __init__(self, log_path):
        self.lock = threading.Lock()
        self.log = open(log_path, "a", buffering=1)
        self.sessions = 0
        self.max_sessions = 0
        self.per_domain = {}
        self.max_per_domain = {}
        self.seen = set()

    def write(self, record):
        with self.lock:
            record.update(
                sessions=self.sessions,
                max_sessions=self.max_sessions,
                max_per_domain=dict(self.max_per_domain),
            )
            self.log.write(json.dumps(record) + "\n")

    def first_time(self, key):
        with self.lock:
            if key in self.seen:
                return False
            self.seen.add(key)
            return True

    def open_session(self):
        with self.lock:
            self.sessions += 1
            self.max_sessions = max(self.max_sessions, self.sessions)

    def close_session(self, domains):
        with self.lock:
            self.sessions -= 1
            for domain in domains:
                self.per_domain[domain] -= 1

    def enter_domain(self, domain):
        with self.lock:
            now = self.per_domain.get(domain, 0) + 1
            self.per_domain[domain] = now
            self.max_per_domain[domain] = max(self.max_per_domain.get(domain, 0), now)


class CountingSMTP(SMTP):
    counts = None

    def connection_made(self, transport):
        # aiosmtpd calls this again after STARTTLS, on the same session.
        if getattr(self, "_original_transport", None) is None:
            self.domains = set()
            self.counts.open_session()
        super().connection_made(transport)

    def connection_lost(self, error):
        self.counts.close_session(self.domains)
        super().connection_lost(error)


class Handler:
    def __init__(self, counts, data_delay):
        self.counts = counts
        self.data_delay = data_delay

    async def handle_RCPT(self, server, session, envelope, address, options):
        local = address.split("@")[0].lower()
        domain = address.rsplit("@", 1)[-1].lower()
        if domain not in server.domains:
            server.domains.add(domain)
            self.counts.enter_domain(domain)
        if local.startswith("reject"):
            return "550 5.1.1 no such user"
        if local.startswith("temp-once") and self.counts.first_time(address):
            return "451 4.7.1 greylisted, try again later"
        if local.startswith("busy-once") and self.counts.first_time(address):
            server.transport.write(b"421 4.3.2 too busy, closing\r\n")
            server.transport.close()
            return "421 4.3.2 too busy, closing"
        if local.startswith("drop-once") and self.counts.first_time(address):
            server.transport.abort()
            return "421 dropped"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.data_delay)
        if any(a.split("@")[0].lower().startswith("slow") for a in envelope.rcpt_tos):
            await asyncio.sleep(1.0)
        content = envelope.original_content or b""
        head = content.split(b"\r\n\r\n", 1)[0]
        message_id = None
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                message_id = line[11:].strip().decode("utf-8", "replace")
        ssl_object = server.transport.get_extra_info("ssl_object")
        self.counts.write(
            {
                "event": "delivered",
                "tls": ssl_object.version() if ssl_object else None,
                "user": session.auth_data.login.decode() if session.authenticated else None,
                "mail_from": envelope.mail_from,
                "rcpt_tos": envelope.rcpt_tos,
                "message_id": message_id,
                "bcc_header": any(
                    l.lower().startswith(b"bcc:") for l in head.split(b"\r\n")
                ),
                "size": len(content),
            }
        )
        return "250 2.0.0 queued"


class Authenticator:
    def __init__(self, user, password):
        self.user = user.encode()
        self.password = password.encode()

    def __call__(self, server, session, envelope, mechanism, auth_data):
        if auth_data.login == self.user and auth_data.password == self.password:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)


class SinkController(Controller):
    def __init__(self, handler, smtp_options, **kwargs):
        self.smtp_options = smtp_options
        super().__init__(handler, **kwargs)

    def factory(self):
        return CountingSMTP(
            self.handler, decode_data=False, enable_SMTPUTF8=True, **self.smtp_options
        )


def tls_and_auth_options(args):
    """Return the keyword arguments of the SMTP class and of the Controller
    for the TLS and AUTH options."""
    smtp_options = {}
    controller_options = {}
    if args.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        if args.tls == "starttls":
            smtp_options.update(
                tls_context=context, require_starttls=args.require_starttls
            )
        else:
            controller_options["ssl_context"] = context
    if args.auth:
        user, password = args.auth.split(":", 1)
        smtp_options.update(
            authenticator=Authenticator(user, password), auth_require_tls=True
        )
    return smtp_options, controller_options


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--data-delay", type=float, default=0.05)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--tls", choices=["starttls", "implicit"])
    parser.add_argument("--require-starttls", action="store_true")
    parser.add_argument("--auth", metavar="USER:PASSWORD")
    args = parser.parse_args()
    smtp_options, controller_options = tls_and_auth_options(args)

    counts = Counts(args.log)
    CountingSMTP.counts = counts

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()

    controller = SinkController(
        Handler(counts, args.data_delay),
        smtp_options,
        hostname="127.0.0.1",
        port=port,
        **controller_options,
    )
    controller.start()
    print(f"READY {port}", flush=True)
    # Runs until the test closes standard input or kills the process.
    sys.stdin.read()
    controller.stop()


if __name__ == "__main__":
    main()
