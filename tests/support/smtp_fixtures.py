"""pytest fixtures for a real SMTP server (Debian's aiosmtpd).

The server is tests/support/smtp_sink.py, run as its own process with
/usr/bin/python3 on a free port of 127.0.0.1. It stores every message it
accepts, with its envelope, as a file; SmtpServer reads them back parsed by
Python's email package.

Fixtures:
- `smtp`: a plain server, already running.
- `smtp_server(start=True, port=None, **options)`: a factory for servers
  that misbehave on purpose (see SmtpServer); `start=False` reserves a port
  on which nothing listens yet (a server that is down), `.start()` later
  brings it up on that same port.
- `tls_cert`: a self-signed certificate for localhost / 127.0.0.1, made with
  the openssl command.
- `tls_ca`: a private CA that signs server certificates with the names a
  test asks for (`tls_ca.server_cert(name, san)`).

Every server a fixture started is stopped when the test ends, whatever the
outcome; a server also exits by itself when the pytest process is gone.
"""

import base64
import email
import email.policy
import json
import os
import signal
import subprocess
import time

import pytest

from pgr_fixtures import free_port, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
SINK = os.path.join(HERE, "smtp_sink.py")
PYTHON = "/usr/bin/python3"

_OPTIONS = {
    # keyword -> (command-line flag, takes a value)
    "tls_cert": ("--tls-cert", True),
    "tls_key": ("--tls-key", True),
    "require_starttls": ("--require-starttls", False),
    "auth_user": ("--auth-user", True),
    "auth_password": ("--auth-password", True),
    "mail_code": ("--mail-code", True),
    "rcpt_code": ("--rcpt-code", True),
    "data_code": ("--data-code", True),
    "hang": ("--hang", False),
}


class Message:
    """One message the server accepted: envelope, raw bytes, parsed form."""

    def __init__(self, record):
        self.seq = record["seq"]
        self.mail_from = record["mail_from"]
        self.rcpt_tos = record["rcpt_tos"]
        self.auth_login = record["auth_login"]
        self.tls = record["tls"]
        self.raw = base64.b64decode(record["data_b64"])
        # Parsed with the wire's CRLF turned into "\n", as the email
        # package expects of text it is given.
        self.msg = email.message_from_bytes(self.raw.replace(b"\r\n", b"\n"),
                                            policy=email.policy.default)

    def __getitem__(self, name):
        return self.msg[name]

    def __repr__(self):
        return (f"<Message {self.seq} from {self.mail_from} to "
                f"{self.rcpt_tos} subject {self.msg['Subject']!r}>")


class SmtpServer:
    """A smtp_sink.py process. Options (keywords):

    tls_cert, tls_key     offer STARTTLS with this certificate and key
    require_starttls      refuse mail until STARTTLS
    auth_user, auth_password
                          offer AUTH PLAIN/LOGIN; refuse MAIL before login
    mail_code, rcpt_code, data_code
                          answer every MAIL / RCPT / DATA with this code
                          (e.g. 550 or 451)
    hang                  accept connections and never answer
    """

    def __init__(self, base, port=None, **options):
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(f"unknown SMTP server options: {sorted(unknown)}")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.base = str(base)
        self.dir = os.path.join(self.base, "mail")
        self.options = options
        self.proc = None
        self._log = None
        os.makedirs(self.dir, exist_ok=True)

    @property
    def log_path(self):
        return os.path.join(self.base, "smtp-sink.log")

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _argv(self, ready):
        argv = [PYTHON, SINK, "--host", self.host, "--port", str(self.port),
                "--dir", self.dir, "--ready-file", ready,
                "--parent-pid", str(os.getpid())]
        for key, value in self.options.items():
            flag, takes_value = _OPTIONS[key]
            if takes_value:
                if value is not None:
                    argv += [flag, str(value)]
            elif value:
                argv.append(flag)
        return argv

    def start(self, timeout=30, **options):
        """Start (or start again, on the same port, with new options)."""
        if self.running():
            raise RuntimeError("the SMTP server is already running")
        self.options.update(options)
        ready = os.path.join(self.base, "smtp-sink.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self._argv(ready), stdout=self._log,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close_log()
                raise RuntimeError(f"SMTP server exited with {code}:\n"
                                   + self.log())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("SMTP server did not come up:\n"
                                   + self.log())
            time.sleep(0.02)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10):
        """Stop the server (the port is then refused); idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._close_log()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None

    def messages(self):
        """Every message accepted so far, in order of arrival."""
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".json"):
                with open(os.path.join(self.dir, name)) as f:
                    out.append(Message(json.load(f)))
        return out

    def wait_for(self, n, timeout=30.0):
        """Wait until at least n messages arrived; return them all."""
        wait_until(lambda: len(self.messages()) >= n, timeout=timeout,
                   what=f"{n} message(s) at the SMTP server")
        return self.messages()

    def env(self, **extra):
        """Worker environment pointing at this server."""
        e = {"PGRUNNER_SMTP_HOST": self.host,
             "PGRUNNER_SMTP_PORT": str(self.port)}
        e.update({k: str(v) for k, v in extra.items()})
        return e


@pytest.fixture
def smtp_server(tmp_path):
    """Factory: smtp_server(start=True, port=None, **options) -> SmtpServer.
    Every server it made is stopped at the end of the test."""
    made = []

    def make(start=True, port=None, **options):
        s = SmtpServer(tmp_path / f"smtp{len(made)}", port=port, **options)
        made.append(s)
        if start:
            s.start()
        return s

    try:
        yield make
    finally:
        for s in made:
            s.stop()


@pytest.fixture
def smtp(smtp_server):
    """A plain SMTP server, running."""
    return smtp_server()


class TlsCert:
    def __init__(self, d):
        self.dir = str(d)
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory):
    """A self-signed certificate (it is its own CA) for localhost and
    127.0.0.1, made by the openssl command."""
    c = TlsCert(tmp_path_factory.mktemp("tls"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec",
         "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", c.key, "-out", c.cert, "-days", "3",
         "-subj", "/CN=localhost",
         # 127.0.0.1 as a DNS name too, as certificates made for clients
         # that match only DNS names (libESMTP alone) have it.
         "-addext", "subjectAltName=DNS:localhost,DNS:127.0.0.1,IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.chmod(c.key, 0o600)
    return c


class TlsCa:
    """A private CA and server certificates it signed (openssl command)."""

    def __init__(self, d):
        self.dir = str(d)
        self.cert = os.path.join(self.dir, "ca.pem")
        self.key = os.path.join(self.dir, "ca.key")
        self._openssl(["req", "-x509", "-newkey", "ec",
                       "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                       "-keyout", self.key, "-out", self.cert, "-days", "3",
                       "-subj", "/CN=pgrunner test CA",
                       "-addext", "basicConstraints=critical,CA:TRUE",
                       "-addext", "keyUsage=critical,keyCertSign,cRLSign"])

    def _openssl(self, args):
        subprocess.run(["openssl"] + args, check=True, cwd=self.dir,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def server_cert(self, name, san):
        """A server certificate and key signed by this CA, with the given
        subjectAltName (e.g. "DNS:localhost,IP:127.0.0.1"); returns
        (cert path, key path)."""
        key = os.path.join(self.dir, f"{name}.key")
        csr = os.path.join(self.dir, f"{name}.csr")
        cert = os.path.join(self.dir, f"{name}.pem")
        ext = os.path.join(self.dir, f"{name}.ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName={san}\n"
                    "basicConstraints=critical,CA:FALSE\n"
                    "extendedKeyUsage=serverAuth\n")
        self._openssl(["req", "-new", "-newkey", "ec",
                       "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                       "-keyout", key, "-out", csr, "-subj", "/CN=localhost"])
        self._openssl(["x509", "-req", "-in", csr, "-CA", self.cert,
                       "-CAkey", self.key, "-CAcreateserial", "-days", "3",
                       "-extfile", ext, "-out", cert])
        os.chmod(key, 0o600)
        return cert, key


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory):
    """A private CA (openssl), to sign server certificates with
    tls_ca.server_cert(name, san)."""
    return TlsCa(tmp_path_factory.mktemp("ca"))
