"""PII redaction: e-mail addresses, public IP addresses and phone numbers become placeholders.

    redactor = PIIRedactor()
    clean = redactor(Document("1", "mail jane@corp.com or call +44 20 7946 0958"))
    clean.text                      # 'mail <EMAIL> or call <PHONE>'
    redactor.stats["redacted/email"]  # 1

Rules (precision first: a false positive destroys useful text such as code or tables):

- e-mail: `local@domain.tld`, local part and host labels bounded in length, TLD of 2+ letters; not image
  names such as `logo@2x.png`, `icon@3x.webp` (no TLD is an image extension; the `2x` alone is no sign:
  `10x.com` is a domain).
- IP: IPv4 with valid octets (0–255, no leading zeros) and IPv6 that `ipaddress` parses; only
  globally routable addresses are replaced. Private (10/8, 172.16/12, 192.168/16, fc00::/7), loopback,
  link-local, reserved, multicast, unspecified and documentation ranges (192.0.2/24, 198.51.100/24,
  203.0.113/24, 2001:db8::/32) stay, as they identify nobody. An address must not touch a digit, a
  letter or a dot-digit on either side, so `1.2.3.4.5` and `v3.11.2.1` survive, and a dotted quad
  right after a version cue ("version", "python", "release", …) is treated as a version string. A
  compressed IPv6 address needs 3+ groups (`2001:db8::1`): slices (`xs[1::2]`, `arr[ff::]`) and
  words (`add::beef`) are valid IPv6 with one or two.
- phone: international `+CC …` with 8–15 digits (E.164), NANP `(212) 555-1234` / `212-555-1234` /
  `212.555.1234` (separators required and the same twice, so bare digit runs such as IDs are kept; a
  space only after a parenthesised area code, as `640 480 1024` is more often sizes than a number), and
  European trunk-prefixed `030 1234567`, `06 12 34 56 78`, `020 7946 0958` with 9–12 digits. Candidates
  that look like dates, or that touch other digits, letters or hyphenated digit groups (ISBNs), are kept.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from typing import ClassVar

from nanoforge.data.documents import Document
from nanoforge.data.filters import Step

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![\w-])")
# high-resolution image names look like addresses: 'logo@2x.png', 'icon@3x.webp'; no TLD is one of these
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "webp", "svg", "avif", "bmp", "ico", "tif", "tiff"})
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.])(?<!\d\.){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:)?(?![\w:])")
VERSION_CUE = re.compile(r"(?:version|ver|release|rel|rev|revision|build|python|update|patch|firmware)"
                         r"\s*[:=]?\s*$", re.IGNORECASE)
_SEP = r"[ \t.\-]"
PHONE = re.compile(
    r"(?<![\w+\-./])(?:"
    rf"\+[1-9]\d{{0,2}}(?:{_SEP}?\(\d{{1,5}}\)|{_SEP}?\d{{1,5}}){{2,6}}"  # +44 20 7946 0958, +1 (212) 555-1234
    r"|\([2-9]\d{2}\) ?[2-9]\d{2}[ .\-]\d{4}"  # (212) 555-1234
    r"|[2-9]\d{2}(?P<sep>[.\-])[2-9]\d{2}(?P=sep)\d{4}"  # 212-555-1234, 212.555.1234
    r"|0\d{1,4}(?:[ /\-]\d{2,8}){1,4}"  # 030 1234567, 06 12 34 56 78, 020 7946 0958
    r")(?![\w]|[\-./]\d)")
DATE_LIKE = re.compile(r"^\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}")


def _public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_global and not ip.is_multicast


@dataclass
class PIIRedactor(Step):
    """Replace e-mails, public IPs and phone numbers with `<EMAIL>`, `<IP>`, `<PHONE>` (see module doc);
    `stats["redacted/<kind>"]` counts replacements. Never drops a document unless redaction itself fails
    (then it is dropped with reason `error:<Type>` rather than passed on unredacted)."""

    name: ClassVar[str] = "pii"
    emails: bool = True
    ips: bool = True
    phones: bool = True
    email_token: str = "<EMAIL>"
    ip_token: str = "<IP>"
    phone_token: str = "<PHONE>"

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        counts = {"email": 0, "ip": 0, "phone": 0}

        def email(m: re.Match[str]) -> str:
            if m.group().rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
                return m.group()
            counts["email"] += 1
            return self.email_token

        def ipv4(m: re.Match[str]) -> str:
            if not _public(m.group()) or VERSION_CUE.search(m.string, max(0, m.start() - 24), m.start()):
                return m.group()
            counts["ip"] += 1
            return self.ip_token

        def ipv6(m: re.Match[str]) -> str:
            s = m.group()
            if s.count(":") < 2 or ("::" in s and len([g for g in s.split(":") if g]) < 3) or not _public(s):
                return s
            counts["ip"] += 1
            return self.ip_token

        def phone(m: re.Match[str]) -> str:
            s = m.group()
            digits = sum(c.isdigit() for c in s)
            lo, hi = (8, 15) if s.startswith("+") else (10, 10) if not s.startswith("0") else (9, 12)
            if not lo <= digits <= hi or DATE_LIKE.match(s):
                return s
            counts["phone"] += 1
            return self.phone_token

        if self.emails and "@" in text:
            text = EMAIL.sub(email, text)
        if self.ips:
            text = IPV4.sub(ipv4, text)
            if ":" in text:
                text = IPV6.sub(ipv6, text)
        if self.phones:
            text = PHONE.sub(phone, text)
        return text, counts

    def apply(self, doc: Document) -> tuple[Document | None, str | None]:
        text, counts = self.redact(doc.text)
        for kind, n in counts.items():
            if n:
                self.stats[f"redacted/{kind}"] += n
        return (doc if text == doc.text else dataclasses.replace(doc, text=text)), None
