"""Password hashes: scrypt round trip, bcrypt compatibility, malformed hashes never raise."""

from __future__ import annotations

import bcrypt
import pytest

from sftpgate.passwords import DUMMY_HASH, check_hash_format, hash_password, verify_password

FAST = 10  # log_n: cheap scrypt for tests


def test_scrypt_hash_round_trips() -> None:
    hashed = hash_password("correct horse", log_n=FAST)
    assert hashed.startswith("$scrypt$ln=10,r=8,p=1$")
    assert check_hash_format(hashed) is None
    assert verify_password("correct horse", hashed) is True


def test_scrypt_hash_round_trips_non_ascii_password() -> None:
    hashed = hash_password("pässwörd ✓", log_n=FAST)
    assert verify_password("pässwörd ✓", hashed) is True
    assert verify_password("passwort ✓", hashed) is False


def test_wrong_password_fails() -> None:
    hashed = hash_password("right", log_n=FAST)
    assert verify_password("wrong", hashed) is False
    assert verify_password("right ", hashed) is False
    assert verify_password("", hashed) is False


def test_same_password_hashes_differently_because_salted() -> None:
    first = hash_password("same", log_n=FAST)
    second = hash_password("same", log_n=FAST)
    assert first != second
    salt_first, salt_second = first.split("$")[3], second.split("$")[3]
    assert salt_first != salt_second
    assert verify_password("same", first) is True
    assert verify_password("same", second) is True


def test_empty_password_can_be_hashed_and_verified() -> None:
    hashed = hash_password("", log_n=FAST)
    assert verify_password("", hashed) is True
    assert verify_password("x", hashed) is False


_GOOD = hash_password("pw", log_n=FAST)
_PARAMS, _SALT, _DIGEST = _GOOD.split("$")[2:]


@pytest.mark.parametrize(
    ("hashed", "reason"),
    [
        pytest.param("", "not a supported hash", id="empty"),
        pytest.param("hunter2", "not a supported hash", id="plain-text"),
        pytest.param("$1$abc$0123456789abcdef", "not a supported hash", id="md5-crypt"),
        pytest.param("$6$salt$" + "x" * 86, "not a supported hash", id="sha512-crypt"),
        pytest.param("$scrypt$", "expected $scrypt$params$salt$hash", id="scrypt-no-parts"),
        pytest.param(f"$scrypt${_PARAMS}${_SALT}", "expected $scrypt$", id="scrypt-missing-hash"),
        pytest.param(f"{_GOOD}$extra", "expected $scrypt$", id="scrypt-extra-part"),
        pytest.param(f"$scrypt$ln=x,r=8,p=1${_SALT}${_DIGEST}", "ln=N,r=N,p=N", id="ln-not-int"),
        pytest.param(f"$scrypt$r=8,p=1${_SALT}${_DIGEST}", "ln=N,r=N,p=N", id="ln-missing"),
        pytest.param(f"$scrypt$ln=0,r=8,p=1${_SALT}${_DIGEST}", "out of range", id="ln-zero"),
        pytest.param(f"$scrypt$ln=21,r=8,p=1${_SALT}${_DIGEST}", "out of range", id="ln-big"),
        pytest.param(f"$scrypt$ln=10,r=33,p=1${_SALT}${_DIGEST}", "out of range", id="r-big"),
        pytest.param(f"$scrypt$ln=10,r=8,p=0${_SALT}${_DIGEST}", "out of range", id="p-zero"),
        pytest.param(
            f"$scrypt$ln=18,r=8,p=1${_SALT}${_DIGEST}", "256 MiB", id="needs-too-much-memory"
        ),
        pytest.param(
            f"$scrypt$ln=20,r=32,p=16${_SALT}${_DIGEST}", "256 MiB", id="max-params-too-much"
        ),
        pytest.param(f"$scrypt${_PARAMS}$${_DIGEST}", "too short", id="empty-salt"),
        pytest.param(f"$scrypt${_PARAMS}${_SALT}$AAAA", "too short", id="short-digest"),
        pytest.param(f"$scrypt${_PARAMS}$A${_DIGEST}", "not base64", id="salt-bad-base64"),
        pytest.param("$2b$12$tooshort", "wrong length", id="bcrypt-short"),
        pytest.param("$2b$12$" + "a" * 60, "wrong length", id="bcrypt-long"),
    ],
)
def test_malformed_hash_is_rejected_with_reason_and_never_verifies(
    hashed: str, reason: str
) -> None:
    problem = check_hash_format(hashed)
    assert problem is not None
    assert reason in problem
    assert verify_password("pw", hashed) is False
    assert verify_password("", hashed) is False


def test_well_formed_but_garbage_bcrypt_hash_verifies_false_without_raising() -> None:
    garbage = "$2b$12$" + "!" * 53
    assert len(garbage) == 60
    assert verify_password("pw", garbage) is False


def test_non_ascii_bcrypt_hash_verifies_false_without_raising() -> None:
    assert verify_password("pw", "$2b$12$" + "é" * 53) is False


def test_bcrypt_hash_from_bcrypt_package_verifies() -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode("ascii")
    assert hashed.startswith("$2b$")
    assert check_hash_format(hashed) is None
    assert verify_password("s3cret", hashed) is True
    assert verify_password("s3cret!", hashed) is False


def test_bcrypt_2y_hash_as_written_by_htpasswd_verifies() -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode("ascii")
    htpasswd_style = "$2y$" + hashed[4:]
    assert check_hash_format(htpasswd_style) is None
    assert verify_password("s3cret", htpasswd_style) is True
    assert verify_password("other", htpasswd_style) is False


def test_over_long_password_against_bcrypt_hash_returns_false_not_raises() -> None:
    hashed = bcrypt.hashpw(b"short", bcrypt.gensalt(rounds=4)).decode("ascii")
    assert verify_password("x" * 200, hashed) is False


def test_dummy_hash_is_well_formed_and_never_matches_empty_password() -> None:
    assert check_hash_format(DUMMY_HASH) is None
    assert verify_password("", DUMMY_HASH) is False
