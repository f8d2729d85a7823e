"""PII redaction: what must be replaced, and the look-alikes that must survive."""

import pytest

from nanoforge.data.documents import Document
from nanoforge.data.pii import PIIRedactor


def redact(text: str) -> str:
    return PIIRedactor().redact(text)[0]


@pytest.mark.parametrize("text,expected", [
    ("mail jane.doe+news@mail.corp.co.uk now", "mail <EMAIL> now"),
    ("Contact: A_B@example.org.", "Contact: <EMAIL>."),
    ("public 8.8.8.8. and 1.1.1.1", "public <IP>. and <IP>"),
    ("v6 2606:4700:4700::1111 here", "v6 <IP> here"),
    ("+44 20 7946 0958", "<PHONE>"),
    ("+1 (212) 555-1234 or +33 6 12 34 56 78", "<PHONE> or <PHONE>"),
    ("call (212) 555-1234, 212-555-1234 or 212.555.1234", "call <PHONE>, <PHONE> or <PHONE>"),
    ("call (212) 555 1234 or (212)555-1234", "call <PHONE> or <PHONE>"),
    ("dns 2620:fe::fe, 2a00:1450:4001::200e", "dns <IP>, <IP>"),  # compressed, three groups or more
    ("Berlin 030 1234567, Paris 06 12 34 56 78, London 020 7946 0958", "Berlin <PHONE>, Paris <PHONE>, London <PHONE>"),
])
def test_redacts(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "private 10.0.0.1 192.168.1.20 172.16.5.4 loopback 127.0.0.1 link-local 169.254.1.1",
    "documentation 192.0.2.5 198.51.100.7 203.0.113.9 2001:db8::1 and fe80::1 ::1 fc00::5",
    "reserved 240.0.0.1 and multicast 224.0.0.251 and 0.0.0.0",
    "Python 3.11.2.1 and version 8.8.8.8 and v8.8.8.8 and 1.2.3.4.5 and 8.8.8.8.1",
    "octets out of range 256.1.1.1 and 300.300.300.300 and leading zeros 08.08.08.08",
    "time 12:30:45 and MAC 00:1a:2b:3c:4d:5e",
    "dates 2024-01-15, 15.03.2024, 01/02/2023 1234 and 2023/12/31",
    "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2 and 978-0-306-40615-7",
    "ids 2125551234 and 123456789012 and order #5551234567 and 4111111111111111",
    "not an email: user@localhost, @handle, a@b",
    "math 3+4 = 7 and 1+2-3",
    "evens = xs[1::2]; rows = df.iloc[10::5]; print(arr[ff::]); np.s_[1::4]; add::beef cafe::babe 2600::",
    "screen 640 480 1024 and sizes 250 300 4000; mixed 212 555-1234 and 212-555.1234",
    "<img src='logo@2x.png'> url(icon@3x.webp) sprite@2x.JPG and a.b@c.svg",
])
def test_look_alikes_survive(text):
    assert redact(text) == text


def test_counts_per_kind_and_unchanged_doc_identity():
    r = PIIRedactor()
    d = Document("1", "a@b.com c@d.org 8.8.8.8, +44 20 7946 0958, 212-555-1234")
    out = r(d)
    assert out.text == "<EMAIL> <EMAIL> <IP>, <PHONE>, <PHONE>"
    assert (r.stats["redacted/email"], r.stats["redacted/ip"], r.stats["redacted/phone"]) == (2, 1, 2)
    assert r.stats["kept"] == 1 and r.stats["modified"] == 1
    clean = Document("2", "nothing to see")
    assert r(clean) is clean


def test_kinds_can_be_switched_off():
    r = PIIRedactor(phones=False, ips=False)
    assert r.redact("x@y.com 8.8.8.8 212-555-1234")[0] == "<EMAIL> 8.8.8.8 212-555-1234"


def test_odd_and_large_inputs():
    r = PIIRedactor()
    assert r.redact("\ud800 x@y.com \udfff")[0] == "\ud800 <EMAIL> \udfff"
    assert r.redact("")[0] == ""
    # linear time on long runs that look like the start of a match (no catastrophic backtracking)
    for run in ("a" * 2_000_000, "1" * 2_000_000, "1." * 1_000_000, "a." * 1_000_000 + "@", ":" * 1_000_000):
        assert r.redact(run)[0] == run
