"""Warnings for risky set-ups (``daemon.tls.exposure_warnings``): a non-loopback
``server.listen`` with auth off or with tokens and no TLS, a non-loopback
``publish.listen`` without TLS or with ``allow_loopback_anonymous``; printed by
``tickwire check-config`` (a real subprocess, exit still 0) and logged by the
daemon at start.

The start-up test listens on 192.0.2.1 (TEST-NET-1, RFC 5737: no machine has it),
so the daemon logs its warnings and then stops with the one line of an address
it cannot bind: nothing listens beyond loopback during the tests.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trustme

from daemon.config import AuthConfig, Config, PublishConfig, ServerConfig, TokenConfig
from daemon.tls import exposure_warnings
from tests.daemon_process import run_cli, tickwire
from tests.test_tls import issue

TOKEN = '[[auth.tokens]]\nname = "desk"\nsha256 = "' + "0" * 64 + '"\n'
TOKENS = AuthConfig(tokens=[TokenConfig(name="desk", sha256="0" * 64)])


def test_each_risky_set_up_is_one_warning_and_safe_ones_none(tmp_path: Path) -> None:
    tls = issue(trustme.CA(), tmp_path, "c")
    public = ServerConfig(listen="0.0.0.0:8765")
    assert exposure_warnings(Config()) == []  # the default: loopback
    [off] = exposure_warnings(Config(server=public, auth=AuthConfig(enabled="off")))
    assert 'authentication is off (auth.enabled = "off") for server.listen 0.0.0.0:8765' in off
    assert "anyone who can reach it" in off
    [clear] = exposure_warnings(Config(server=public, auth=TOKENS))
    assert "tokens travel in the clear" in clear and "server.tls.cert" in clear
    [clear] = exposure_warnings(Config(server=ServerConfig(listen="[2001:db8::1]:8765"),
                                       auth=AuthConfig(enabled="on", tokens=TOKENS.tokens)))
    assert "[2001:db8::1]:8765 without TLS" in clear
    assert exposure_warnings(Config(server=attrs.evolve(public, tls=tls), auth=TOKENS)) == []
    # auth on, on loopback: no token leaves the machine
    assert exposure_warnings(Config(auth=AuthConfig(enabled="on", tokens=TOKENS.tokens))) == []
    # the publish listener
    publish = PublishConfig(listen="0.0.0.0:8766", allow_loopback_anonymous=True)
    clear, ignored = exposure_warnings(Config(publish=publish))
    assert "publish.listen 0.0.0.0:8766 is not a loopback address and has no TLS" in clear
    assert "publish.allow_loopback_anonymous is ignored for publish.listen 0.0.0.0:8766" in ignored
    [ignored] = exposure_warnings(Config(publish=publish, server=ServerConfig(tls=tls)))
    assert "allow_loopback_anonymous is ignored" in ignored
    loopback = PublishConfig(listen="127.0.0.1:8766", allow_loopback_anonymous=True)
    assert exposure_warnings(Config(publish=loopback)) == []
    assert exposure_warnings(Config(publish=PublishConfig(allow_loopback_anonymous=True))) == []
    assert exposure_warnings(Config(publish=PublishConfig(listen="localhost:8766"))) == []


RISKY = [
    ('[server]\nlisten = "0.0.0.0:8765"\n[auth]\nenabled = "off"\n',
     ['authentication is off (auth.enabled = "off") for server.listen 0.0.0.0:8765']),
    ('[server]\nlisten = "0.0.0.0:8765"\n' + TOKEN,
     ["authentication is on for 0.0.0.0:8765 without TLS: client tokens travel in the clear"]),
    ('[publish]\nlisten = "0.0.0.0:8766"\nallow_loopback_anonymous = true\n',
     ["publish.listen 0.0.0.0:8766 is not a loopback address and has no TLS",
      "publish.allow_loopback_anonymous is ignored for publish.listen 0.0.0.0:8766"]),
]


@pytest.mark.parametrize(("text", "warnings"), RISKY)
async def test_check_config_prints_each_warning_and_still_exits_0(
        tmp_path: Path, text: str, warnings: list[str]) -> None:
    path = tmp_path / "risky.toml"
    path.write_text(text)
    result = await run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"{path}: ok")
    lines = result.stderr.decode().splitlines()
    assert len(lines) == len(warnings), lines
    for line, warning in zip(lines, warnings, strict=True):
        assert line.startswith("warning: ") and warning in line


async def test_check_config_is_silent_for_a_safe_config_and_refuses_a_bad_floor(
        tmp_path: Path) -> None:
    safe = tmp_path / "safe.toml"
    safe.write_text('[server]\nlisten = "127.0.0.1:8765"\nmin_throttle_ms = 100\n'
                    'max_throttled = 20\n[auth]\nenabled = "off"\n')
    result = await run_cli("check-config", str(safe))
    assert result.returncode == 0 and result.stderr == b""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nmin_throttle_ms = 70000\n")
    result = await run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert result.stderr.decode() == ("tickwire: config error: must be from 0 to 60000 (the "
                                      "range of throttle_ms), got 70000 @ server.min_throttle_ms\n")


async def test_the_daemon_logs_the_warnings_at_start(tmp_path: Path) -> None:
    config = tmp_path / "public.toml"
    config.write_text(
        '[server]\nlisten = "192.0.2.1:0"\n[auth]\nenabled = "off"\n'
        '[publish]\nlisten = "192.0.2.1:0"\nallow_loopback_anonymous = true\n'
        f'[admin]\nsocket = "{tmp_path / "admin.sock"}"\n')
    async with tickwire("run", "--config", str(config)) as daemon:
        await daemon.wait_for(r"level=warning .*authentication is off .*192\.0\.2\.1:0")
        await daemon.wait_for(r"level=warning .*publish\.listen 192\.0\.2\.1:0 is not a "
                              r"loopback address and has no TLS")
        await daemon.wait_for(r"level=warning .*allow_loopback_anonymous is ignored")
        # no machine has 192.0.2.1: the start ends there, in one line (exit 2)
        await daemon.wait_for(r"^tickwire: broadcast server: cannot listen on 192\.0\.2\.1:0")
        code = await daemon.process.wait()
    assert code == 2, daemon.log()
    warnings = [line for line in daemon.lines if "level=warning" in line]
    assert len(warnings) == 3, daemon.log()
