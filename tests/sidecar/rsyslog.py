"""A real rsyslogd for the syslog exporter's tests, and a strict RFC 5424 reader.

:class:`Rsyslog` starts Debian's ``rsyslogd -n`` with its own config: UDP, TCP and (when
the gtls driver is installed) TLS inputs, one of them requiring a client certificate, on free loopback ports, ``mmpstrucdata`` to
parse structured data the way rsyslog does, and one JSON line per message with the
raw message and rsyslog's reading of it. :func:`parse_rfc5424` checks a raw message
against the RFC's grammar, stricter than rsyslog's own parser.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.testing import free_port

RSYSLOGD = shutil.which("rsyslogd") or next(iter(glob.glob("/usr/sbin/rsyslogd")), None)
HAS_GTLS = bool(glob.glob("/usr/lib/*/rsyslog/lmnsd_gtls.so") + glob.glob("/usr/lib/rsyslog/lmnsd_gtls.so"))
OPENSSL = shutil.which("openssl")
WHY_NOT = "rsyslogd not installed (Debian package rsyslog: run scripts/setup.sh as root)"

BOM = b"\xef\xbb\xbf"
_HEADER = re.compile(rb"<(\d{1,3})>1 (\S+) ([!-~]{1,255}) ([!-~]{1,48}) ([!-~]{1,128}) ([!-~]{1,32}) ")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")
_SD_NAME = rb'[!#-<>-\\^-~]{1,32}'  # PRINTUSASCII except '=', ']', '"' (and space, outside the range)


@dataclass
class Syslog5424:
    pri: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]] = field(default_factory=dict)
    msg: str = ""
    bom: bool = False

    @property
    def severity(self) -> int:
        return self.pri % 8

    @property
    def facility(self) -> int:
        return self.pri // 8


def parse_rfc5424(raw: bytes) -> Syslog5424:
    """Parse one message by RFC 5424's ABNF; AssertionError naming the first violation."""
    m = _HEADER.match(raw)
    assert m, f"header does not match RFC 5424: {raw[:120]!r}"
    pri = int(m.group(1))
    assert pri <= 191 and (m.group(1) == b"0" or not m.group(1).startswith(b"0")), f"bad PRI {pri}"
    ts = m.group(2).decode()
    assert ts == "-" or _TIMESTAMP.fullmatch(ts), f"bad TIMESTAMP {ts!r}"
    out = Syslog5424(pri, ts, *(g.decode() for g in m.group(3, 4, 5, 6)))
    rest = raw[m.end():]
    if rest.startswith(b"-"):
        rest = rest[1:]
    else:
        assert rest.startswith(b"["), f"expected STRUCTURED-DATA at {rest[:40]!r}"
        while rest.startswith(b"["):
            rest = _sd_element(rest[1:], out.sd)
    if rest:
        assert rest.startswith(b" "), f"expected SP before MSG at {rest[:40]!r}"
        body = rest[1:]
        out.bom = body.startswith(BOM)
        out.msg = body[len(BOM):].decode("utf-8") if out.bom else body.decode("utf-8", "replace")
    return out


def _sd_element(rest: bytes, into: dict) -> bytes:
    m = re.match(_SD_NAME, rest)
    assert m, f"bad SD-ID at {rest[:40]!r}"
    sd_id = m.group(0).decode()
    assert sd_id not in into, f"SD-ID {sd_id} twice"
    params = into[sd_id] = {}
    rest = rest[m.end():]
    while rest.startswith(b" "):
        m = re.match(_SD_NAME + rb'="', rest[1:])
        assert m, f"bad SD-PARAM at {rest[:40]!r}"
        name = m.group(0)[:-2].decode()
        rest = rest[1 + m.end():]
        value = bytearray()
        i = 0
        while True:
            assert i < len(rest), "unterminated PARAM-VALUE"
            c = rest[i:i + 1]
            if c == b"\\" and rest[i + 1:i + 2] in (b'"', b"\\", b"]"):
                value += rest[i + 1:i + 2]
                i += 2
                continue
            assert c != b"]", f"unescaped ']' in the value of {name}"
            if c == b'"':
                break
            value += c
            i += 1
        params[name] = value.decode("utf-8")
        rest = rest[i + 1:]
    assert rest.startswith(b"]"), f"expected ']' closing {sd_id} at {rest[:40]!r}"
    return rest[1:]


class Rsyslog:
    """rsyslogd in the foreground with inputs ``udp``, ``tcp``, ``tls`` and ``mtls`` (when available) on loopback."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.out = workdir / "received.jsonl"
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.tcp_port = free_port(socket.SOCK_STREAM)
        self.tls_port = free_port(socket.SOCK_STREAM) if HAS_GTLS and OPENSSL else None
        #: TLS that requires a client certificate signed by ``ca_file`` (x509/certvalid)
        self.mtls_port = free_port(socket.SOCK_STREAM) if self.tls_port else None
        self.proc: subprocess.Popen | None = None
        if self.tls_port:
            self.ca_file, self.key_file = workdir / "server.pem", workdir / "server.key"
            subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-keyout", str(self.key_file), "-out", str(self.ca_file), "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                           check=True, capture_output=True)
            # a client certificate signed by the server's (self-signed, CA:TRUE) certificate
            self.client_cert, self.client_key = workdir / "client.pem", workdir / "client.key"
            csr = workdir / "client.csr"
            subprocess.run([OPENSSL, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.client_key),
                            "-out", str(csr), "-subj", "/CN=sidecar"], check=True, capture_output=True)
            subprocess.run([OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(self.ca_file), "-CAkey",
                            str(self.key_file), "-CAcreateserial", "-out", str(self.client_cert), "-days", "2"],
                           check=True, capture_output=True)
        (workdir / "rsyslog.conf").write_text(self._config())

    def _config(self) -> str:
        d = self.dir
        tls_global = (f' DefaultNetstreamDriverCAFile="{self.ca_file}" DefaultNetstreamDriverCertFile="{self.ca_file}"'
                      f' DefaultNetstreamDriverKeyFile="{self.key_file}"') if self.tls_port else ""
        tls_input = (f'input(type="imtcp" name="tls" address="127.0.0.1" port="{self.tls_port}" '
                     'streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")\n'
                     f'input(type="imtcp" name="mtls" address="127.0.0.1" port="{self.mtls_port}" '
                     'streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")'
                     if self.tls_port else "")
        props = {"raw": "rawmsg", "version": "protocol-version", "sd": "structured-data", "msgid": "msgid",
                 "app": "app-name", "procid": "procid", "host": "hostname", "severity": "syslogseverity",
                 "facility": "syslogfacility", "msg": "msg", "input": "inputname", "parsed_sd": "$!rfc5424-sd"}
        template = "\n".join(f'  property(outname="{k}" name="{v}" format="jsonf")' for k, v in props.items())
        return f"""
global(workDirectory="{d}" maxMessageSize="64k"{tls_global})
module(load="imudp")
module(load="imtcp" maxSessions="200")
module(load="mmpstrucdata")
input(type="imudp" name="udp" address="127.0.0.1" port="{self.udp_port}")
input(type="imtcp" name="tcp" address="127.0.0.1" port="{self.tcp_port}")
{tls_input}
template(name="json" type="list" option.jsonf="on") {{
{template}
}}
action(type="mmpstrucdata")
action(type="omfile" file="{self.out}" template="json" flushOnTXEnd="on" asyncWriting="off")
"""

    def start(self, timeout: float = 20.0) -> "Rsyslog":
        log = open(self.dir / "rsyslogd.log", "ab")
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.dir / "rsyslog.conf"),
                                      "-i", str(self.dir / "rsyslogd.pid")], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        # ready when a probe sent to each input has been written out
        deadline = time.monotonic() + timeout
        probes = {"udp": self._probe_udp, "tcp": self._probe_tcp}
        seen: set[str] = set()
        while set(probes) - seen:
            assert self.proc.poll() is None, f"rsyslogd exited: {self.log()}"
            assert time.monotonic() < deadline, f"rsyslogd not ready: {self.log()}"
            for name in set(probes) - seen:
                probes[name]()
            seen = {r["input"] for r in self.records() if r["msgid"] == "probe"}
            time.sleep(0.05)
        if self.tls_port:
            _wait_port(self.tls_port, deadline)
            _wait_port(self.mtls_port, deadline)
        return self

    _PROBE = b"<14>1 - probe rsyslog-test - probe - ready?"

    def _probe_udp(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(self._PROBE, ("127.0.0.1", self.udp_port))

    def _probe_tcp(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=1) as s:
                s.sendall(b"%d %s" % (len(self._PROBE), self._PROBE))
        except OSError:
            pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        p = self.dir / "rsyslogd.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def records(self) -> list[dict]:
        """Every message received so far (probes included), as rsyslog read it."""
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text(encoding="utf-8").splitlines():
            if line.endswith("}"):  # a line being written is complete once it closes
                r = json.loads(line)
                r["parsed_sd"] = json.loads(r["parsed_sd"]) if r["parsed_sd"] else {}
                out.append(r)
        return out

    def wait_for(self, cond, timeout: float = 30.0) -> list[dict]:
        """Received records (probes excluded) once ``cond(records)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.records() if r["msgid"] != "probe"]
            if cond(got):
                return got
            assert time.monotonic() < deadline, ("rsyslog did not receive what was expected; got "
                                                        f"{len(got)} messages, the last: {[r['raw'] for r in got[-5:]]}")
            time.sleep(0.05)


def _wait_port(port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listening on {port}"
            time.sleep(0.05)


def available() -> bool:
    return RSYSLOGD is not None and os.access(RSYSLOGD, os.X_OK)
