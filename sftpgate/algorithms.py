"""The SSH algorithms ``serve`` offers: what asyncssh has, and what the config asks for.

The policy (no SHA-1, no CBC, no ``umac-64`` by default) is in
:class:`~sftpgate.config.AlgorithmsConfig`; this module answers which names
this asyncssh supports and builds the listener's options from the config.
"""

from __future__ import annotations

import functools
from typing import Any

# Signature algorithms accepted for users' public keys, besides the host key list: SHA-2 only.
USER_SIGNATURES = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-256",
    "rsa-sha2-512",
)


@functools.cache
def supported(kind: str) -> tuple[str, ...]:
    """Names of the ``kind`` ("kex", "cipher", "mac", "host key") algorithms asyncssh has."""
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs
    from asyncssh.public_key import get_public_key_algs

    found = {
        "kex": get_kex_algs,
        "cipher": get_encryption_algs,
        "mac": get_mac_algs,
        "host key": get_public_key_algs,
    }[kind]()
    names = (a.decode("ascii") for a in found)
    # GSS key exchange needs Kerberos set up; asyncssh offers it only with a GSS server.
    return tuple(n for n in names if not n.startswith("gss-"))


def available(kind: str, names: tuple[str, ...]) -> list[str]:
    """``names`` that this asyncssh has, in order (the defaults name some it may lack)."""
    known = set(supported(kind))
    return [n for n in names if n in known]


def listen_options(
    kex: tuple[str, ...],
    ciphers: tuple[str, ...],
    macs: tuple[str, ...],
    host_keys: tuple[str, ...],
) -> dict[str, Any]:
    """Keyword arguments for ``asyncssh.listen`` that offer exactly these algorithms."""
    signatures = [*host_keys, *(s for s in USER_SIGNATURES if s not in host_keys)]
    return {
        "kex_algs": available("kex", kex),
        "encryption_algs": available("cipher", ciphers),
        "mac_algs": available("mac", macs),
        "signature_algs": available("host key", tuple(signatures)),
    }
