"""A real SMTP server for pgrunner's tests, built on Debian's aiosmtpd.

Run as its own process with /usr/bin/python3 (tests/support/smtp_fixtures.py
does that). Every message it accepts becomes one file DIR/NNNNNN.json holding
the envelope and the raw message:

    {"seq": 1, "mail_from": "...", "rcpt_tos": [...], "auth_login": "..." or
     null, "tls": true/false, "data_b64": "<the DATA bytes, base64>"}

written to a temporary name and renamed, so a reader never sees half a file.

Options make it misbehave on purpose: --rcpt-code 550 answers every RCPT
with that code, --data-code 554 every DATA, --mail-code 451 every MAIL;
--tls-cert/--tls-key offer STARTTLS (--require-starttls refuses mail before
it); --auth-user/--auth-password offer AUTH PLAIN and LOGIN, and refuse MAIL
before a successful login; --hang accepts connections and never says a word
(a hung server). Once listening it writes --ready-file. It exits on SIGTERM
or SIGINT, and on its own when its parent, the process that started it
(--parent-pid), is gone, so a crashed test run leaves no server behind.
"""

import argparse
import asyncio
import base64
import json
import os
import signal
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def reply(code, default):
    """The full reply line for a code given on the command line."""
    text = {
        "4": "4.3.0 Temporary failure, try again later (test sink)",
        "5": "5.7.1 Rejected (test sink)",
    }.get(str(code)[0], default)
    return f"{code} {text}"


class Sink:
    """aiosmtpd handler: stores accepted messages, or refuses on purpose."""

    def __init__(self, args):
        self.args = args
        os.makedirs(args.dir, exist_ok=True)
        # A restarted server goes on numbering where the last one stopped.
        self.seq = max([int(n[:6]) for n in os.listdir(args.dir)
                        if n.endswith(".json")] + [0])

    async def handle_MAIL(self, server, session, envelope, address,
                          mail_options):
        if self.args.mail_code:
            return reply(self.args.mail_code, "refused")
        if self.args.auth_user and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address,
                          rcpt_options):
        if self.args.rcpt_code:
            return reply(self.args.rcpt_code, "refused")
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.args.data_code:
            return reply(self.args.data_code, "refused")
        self.seq += 1
        login = session.auth_data
        if isinstance(login, LoginPassword):
            login = login.login.decode("utf-8", "replace")
        elif login is not None:
            login = str(login)
        record = {
            "seq": self.seq,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "auth_login": login,
            "tls": session.ssl is not None,
            "data_b64": base64.b64encode(
                envelope.original_content or b"").decode("ascii"),
        }
        name = os.path.join(self.args.dir, f"{self.seq:06d}.json")
        tmp = name + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.rename(tmp, name)
        return "250 2.0.0 Message accepted for delivery"


class Authenticator:
    def __init__(self, user, password):
        self.user = user.encode()
        self.password = password.encode()

    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login == self.user
              and auth_data.password == self.password)
        return AuthResult(success=ok, handled=False,
                          auth_data=auth_data if ok else None)


async def hang(reader, writer):
    """A server that accepted the connection and then hung."""
    try:
        await reader.read()
    finally:
        writer.close()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--ready-file")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--require-starttls", action="store_true")
    p.add_argument("--auth-user")
    p.add_argument("--auth-password", default="")
    p.add_argument("--mail-code", type=int)
    p.add_argument("--rcpt-code", type=int)
    p.add_argument("--data-code", type=int)
    p.add_argument("--hang", action="store_true")
    return p.parse_args(argv)


async def main(args):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(0))

    if args.hang:
        server = await asyncio.start_server(hang, args.host, args.port,
                                            reuse_address=True)
    else:
        tls = None
        if args.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        handler = Sink(args)
        kw = dict(hostname="pgr-smtp-sink", tls_context=tls,
                  require_starttls=args.require_starttls and tls is not None,
                  decode_data=False, timeout=60)
        if args.auth_user:
            # libESMTP sends PLAIN/LOGIN in the clear when no TLS is on, as
            # the client's configuration asked: accept that here.
            kw.update(authenticator=Authenticator(args.auth_user,
                                                  args.auth_password),
                      auth_require_tls=False)

        def factory():
            return SMTP(handler, **kw)

        server = await loop.create_server(factory, args.host, args.port,
                                          reuse_address=True)

    async def watch_parent():
        # The starter is our parent; once it is gone we are re-parented
        # (a dead parent may linger as a zombie, so kill(pid, 0) would not
        # tell).
        while args.parent_pid:
            await asyncio.sleep(0.5)
            if os.getppid() != args.parent_pid:
                if not stop.done():
                    stop.set_result(0)
                return

    watcher = asyncio.ensure_future(watch_parent())
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(tmp, args.ready_file)
    try:
        await stop
    finally:
        watcher.cancel()
        server.close()
        await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main(parse_args(sys.argv[1:])))
