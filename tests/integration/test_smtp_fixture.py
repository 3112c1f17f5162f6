"""The SMTP test server itself (tests/support/smtp_fixtures.py), driven with
Python's smtplib: what it stores, how it misbehaves on request, and that it
comes and goes on one port. The email job's own tests (test_email.py) rely
on all of this."""

import smtplib
import socket
import ssl

import pytest

MSG = (b"From: a@example.com\r\nTo: b@example.com\r\n"
       b"Subject: fixture check\r\n\r\nhello\r\n")


def test_stores_message_and_envelope(smtp):
    with smtplib.SMTP(smtp.host, smtp.port, timeout=10) as c:
        c.sendmail("a@example.com", ["b@example.com", "c@example.com"], MSG)
    (m,) = smtp.wait_for(1)
    assert m.mail_from == "a@example.com"
    assert m.rcpt_tos == ["b@example.com", "c@example.com"]
    assert m["Subject"] == "fixture check"
    assert m.msg.get_content().strip() == "hello"
    assert m.tls is False and m.auth_login is None


def test_refuses_recipients_on_request(smtp_server):
    s = smtp_server(rcpt_code=550)
    with smtplib.SMTP(s.host, s.port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail("a@example.com", ["b@example.com"], MSG)
    assert e.value.recipients["b@example.com"][0] == 550
    assert s.messages() == []


def test_refuses_data_on_request(smtp_server):
    s = smtp_server(data_code=451)
    with smtplib.SMTP(s.host, s.port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("a@example.com", ["b@example.com"], MSG)
    assert e.value.smtp_code == 451
    assert s.messages() == []


def test_down_then_up_on_the_same_port(smtp_server):
    s = smtp_server(start=False)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((s.host, s.port), timeout=5)
    s.start()
    with smtplib.SMTP(s.host, s.port, timeout=10) as c:
        c.sendmail("a@example.com", ["b@example.com"], MSG)
    assert len(s.wait_for(1)) == 1
    s.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((s.host, s.port), timeout=5)
    s.start()  # again, same port; numbering goes on
    with smtplib.SMTP(s.host, s.port, timeout=10) as c:
        c.sendmail("a@example.com", ["b@example.com"], MSG)
    assert [m.seq for m in s.wait_for(2)] == [1, 2]


def test_starttls_with_self_signed_certificate(smtp_server, tls_cert):
    s = smtp_server(tls_cert=tls_cert.cert, tls_key=tls_cert.key,
                    require_starttls=True)
    ctx = ssl.create_default_context(cafile=tls_cert.cert)
    with smtplib.SMTP(s.host, s.port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPSenderRefused):
            c.sendmail("a@example.com", ["b@example.com"], MSG)
    with smtplib.SMTP("localhost", s.port, timeout=10) as c:
        c.starttls(context=ctx)
        c.sendmail("a@example.com", ["b@example.com"], MSG)
    (m,) = s.wait_for(1)
    assert m.tls is True


def test_auth(smtp_server):
    s = smtp_server(auth_user="mailer", auth_password="s3cret")
    with smtplib.SMTP(s.host, s.port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("a@example.com", ["b@example.com"], MSG)
        assert e.value.smtp_code == 530
    with smtplib.SMTP(s.host, s.port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("mailer", "wrong")
    with smtplib.SMTP(s.host, s.port, timeout=10) as c:
        c.login("mailer", "s3cret")
        c.sendmail("a@example.com", ["b@example.com"], MSG)
    (m,) = s.wait_for(1)
    assert m.auth_login == "mailer"


def test_hang_accepts_and_never_answers(smtp_server):
    s = smtp_server(hang=True)
    with socket.create_connection((s.host, s.port), timeout=5) as c:
        c.settimeout(1.0)
        with pytest.raises(socket.timeout):
            c.recv(100)


def test_stop_is_idempotent_and_refuses_unknown_options(smtp_server):
    s = smtp_server()
    s.stop()
    s.stop()
    assert not s.running()
    with pytest.raises(TypeError):
        smtp_server(bogus=1)
