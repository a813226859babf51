"""The tap relays bytes unchanged, whatever they are, and never dies of them.

sftp-server is replaced by `cat` here: it echoes what the client sends, so the
bytes the client gets back must be exactly the bytes it sent, through both
pumps and past the parser, which sees garbage in both directions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SFTPGATE = [sys.executable, "-m", "sftpgate", "subsystem"]


def echo_config(tmp: Path) -> Path:
    path = tmp / "config.yaml"
    if not path.exists():
        path.write_text(
            yaml.safe_dump(
                {
                    "server": {"state_dir": str(tmp / "state")},
                    "subsystem": {
                        "sftp_server": "/bin/cat",
                        "socket": str(tmp / "none.sock"),
                        "spool_dir": str(tmp / "spool"),
                        "ack_timeout": 0.2,
                    },
                }
            )
        )
        (tmp / "spool").mkdir()
    return path


def relay(config: Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*SFTPGATE, "--config", str(config)],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=4096),
        # Valid-looking lengths with garbage bodies, truncated at random.
        st.lists(st.tuples(st.integers(0, 300_000), st.binary(max_size=64)), max_size=8).map(
            lambda parts: b"".join(n.to_bytes(4, "big") + body for n, body in parts)
        ),
    )
)
def test_any_byte_stream_is_relayed_unchanged(tmp_path: Path, data: bytes) -> None:
    result = relay(echo_config(tmp_path), data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_a_large_stream_of_real_packets_and_garbage_is_relayed_unchanged(tmp_path: Path) -> None:
    write = (
        b"\x00\x04\x00\x1d\x06\x00\x00\x00\x07\x00\x00\x00\x04abcd"
        + bytes(8)
        + (0x40000).to_bytes(4, "big")
        + b"w" * 0x40000
    )
    data = b"\x00\x00\x00\x05\x01\x00\x00\x00\x03" + write * 8 + b"\xff" * 100_000
    result = relay(echo_config(tmp_path), data)
    assert result.returncode == 0
    assert result.stdout == data
    # The tap said nothing to the client: diagnostics go to syslog, not the channel.
    assert result.stderr == b""
