"""Tests of zcells.sockets.keys: CURVE key files, their modes and their checks."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest
import zmq
import zmq.auth

from zcells.errors import EnvironmentMismatch, KeyFileError, ValidationError
from zcells.sockets import keys
from zcells.sockets.keys import (
    KeyPair,
    check_environment,
    check_public_key,
    generate_keypair,
    load_keypair,
    read_public_key,
)

NAME = "cell"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keys"


@pytest.fixture
def pair(keys_dir: Path) -> KeyPair:
    return generate_keypair(keys_dir, NAME)


@pytest.fixture
def restore_umask() -> Iterator[None]:
    original = os.umask(0o022)
    os.umask(original)
    yield
    os.umask(original)


def set_secret_line(path: Path, value: str) -> None:
    """Replace the secret-key value in `path`, keeping the file (and its mode)."""
    lines = path.read_text().splitlines()
    lines = [f'    secret-key = "{value}"' if "secret-key" in ln else ln for ln in lines]
    path.write_text("\n".join(lines) + "\n")


# --- generate_keypair ---------------------------------------------------------------


def test_generate_writes_both_files_with_their_modes(keys_dir: Path, pair: KeyPair) -> None:
    assert mode_of(keys_dir) == 0o700
    assert mode_of(keys_dir / "cell.key") == 0o644
    assert mode_of(keys_dir / "cell.key_secret") == 0o600
    assert sorted(os.listdir(keys_dir)) == ["cell.key", "cell.key_secret"]  # no temp files
    assert pair.name == NAME
    assert pair.secret_path == keys_dir / "cell.key_secret"
    assert len(pair.public) == 40
    assert len(pair.secret) == 40
    assert pair.public != pair.secret
    assert pair.secret not in repr(pair)
    assert pair.secret not in (keys_dir / "cell.key").read_text()


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o277])
@pytest.mark.usefixtures("restore_umask")
def test_generate_modes_do_not_depend_on_umask(tmp_path: Path, mask: int) -> None:
    os.umask(mask)
    keys_dir = tmp_path / "keys"
    generate_keypair(keys_dir, NAME)
    assert mode_of(keys_dir) == 0o700
    assert mode_of(keys_dir / "cell.key") == 0o644
    assert mode_of(keys_dir / "cell.key_secret") == 0o600


def test_pyzmq_reads_the_files_and_the_secret_derives_the_public(
    keys_dir: Path, pair: KeyPair
) -> None:
    public, secret = zmq.auth.load_certificate(keys_dir / "cell.key")
    assert public == pair.public.encode()
    assert secret is None
    public, secret = zmq.auth.load_certificate(keys_dir / "cell.key_secret")
    assert (public, secret) == (pair.public.encode(), pair.secret.encode())
    assert zmq.curve_public(pair.secret.encode()) == pair.public.encode()
    assert (keys_dir / "cell.key").read_text().startswith("#")


@pytest.mark.parametrize("existing", ["cell.key", "cell.key_secret"])
def test_generate_refuses_to_overwrite_without_force(
    keys_dir: Path, pair: KeyPair, existing: str
) -> None:
    other = "cell.key_secret" if existing == "cell.key" else "cell.key"
    (keys_dir / other).unlink()
    before = (keys_dir / existing).read_bytes()
    with pytest.raises(KeyFileError, match="pass --force to replace it") as caught:
        generate_keypair(keys_dir, NAME)
    assert caught.value.path == str(keys_dir / existing)
    assert (keys_dir / existing).read_bytes() == before
    assert not (keys_dir / other).exists()


def test_generate_with_force_replaces_the_pair(keys_dir: Path, pair: KeyPair) -> None:
    replaced = generate_keypair(keys_dir, NAME, force=True)
    assert replaced.public != pair.public
    assert replaced.secret != pair.secret
    assert load_keypair(keys_dir, NAME) == replaced
    assert mode_of(keys_dir / "cell.key_secret") == 0o600
    assert mode_of(keys_dir / "cell.key") == 0o644
    assert sorted(os.listdir(keys_dir)) == ["cell.key", "cell.key_secret"]


def test_generate_refuses_an_existing_directory_open_to_others(keys_dir: Path) -> None:
    keys_dir.mkdir(parents=True)
    keys_dir.chmod(0o755)
    with pytest.raises(KeyFileError) as caught:
        generate_keypair(keys_dir, NAME)
    assert caught.value.path == str(keys_dir)
    assert "0755" in str(caught.value)
    assert f"run `chmod 700 {keys_dir}`" in str(caught.value)
    assert mode_of(keys_dir) == 0o755
    assert os.listdir(keys_dir) == []


def test_generate_uses_an_existing_private_directory(keys_dir: Path) -> None:
    keys_dir.mkdir(parents=True, mode=0o700)
    keys_dir.chmod(0o700)
    pair = generate_keypair(keys_dir, "a.b-c_1")
    assert (keys_dir / "a.b-c_1.key").is_file()
    assert read_public_key(keys_dir, "a.b-c_1") == pair.public


@pytest.mark.parametrize("bad", ["", "a!b", "../x", "a/b", "x" * 65])
def test_generate_rejects_bad_names(keys_dir: Path, bad: str) -> None:
    with pytest.raises(ValidationError, match="key name"):
        generate_keypair(keys_dir, bad)
    assert not keys_dir.exists()


# --- read_public_key ----------------------------------------------------------------


def test_read_public_key_from_the_public_file(keys_dir: Path, pair: KeyPair) -> None:
    assert read_public_key(keys_dir, NAME) == pair.public


def test_read_public_key_derives_it_from_the_secret(keys_dir: Path, pair: KeyPair) -> None:
    (keys_dir / "cell.key").unlink()
    assert read_public_key(keys_dir, NAME) == pair.public


def test_read_public_key_missing(keys_dir: Path) -> None:
    keys_dir.mkdir(parents=True)
    with pytest.raises(KeyFileError) as caught:
        read_public_key(keys_dir, NAME)
    message = str(caught.value)
    assert str(keys_dir / "cell.key") in message
    assert "no such key file" in message
    assert f"create it with `zcells keys gen cell --dir {keys_dir}`" in message


def test_read_public_key_corrupt(keys_dir: Path, pair: KeyPair) -> None:
    (keys_dir / "cell.key").write_text('curve\n    public-key = "too-short"\n')
    with pytest.raises(KeyFileError, match="public-key is not 40-character Z85") as caught:
        read_public_key(keys_dir, NAME)
    assert caught.value.path == str(keys_dir / "cell.key")


# --- load_keypair -------------------------------------------------------------------


def test_load_keypair_round_trip(keys_dir: Path, pair: KeyPair) -> None:
    loaded = load_keypair(keys_dir, NAME)
    assert loaded == pair
    assert loaded.secret == pair.secret


def test_load_keypair_without_public_file(keys_dir: Path, pair: KeyPair) -> None:
    (keys_dir / "cell.key").unlink()
    assert load_keypair(keys_dir, NAME) == pair


def _dir_open(d: Path, _: KeyPair) -> None:
    d.chmod(0o755)


def _secret_open(d: Path, _: KeyPair) -> None:
    (d / "cell.key_secret").chmod(0o644)


def _secret_missing(d: Path, _: KeyPair) -> None:
    (d / "cell.key_secret").unlink()


def _secret_missing_in_open_dir(d: Path, _: KeyPair) -> None:
    (d / "cell.key_secret").unlink()
    d.chmod(0o1777)  # like /tmp: the missing file is the problem to name


def _dir_missing(d: Path, _: KeyPair) -> None:
    for child in d.iterdir():
        child.unlink()
    d.rmdir()


def _garbage(d: Path, _: KeyPair) -> None:
    (d / "cell.key_secret").write_text("this is not a certificate\n")


def _not_utf8(d: Path, _: KeyPair) -> None:
    (d / "cell.key_secret").write_bytes(b"\xff\xfe secret-key = \x80\n")


def _bad_z85(d: Path, _: KeyPair) -> None:
    set_secret_line(d / "cell.key_secret", "~" + "a" * 39)


def _overflowing_z85(d: Path, _: KeyPair) -> None:
    set_secret_line(d / "cell.key_secret", "#" * 40)  # Z85 alphabet, but above 2**32


def _short_secret(d: Path, pair: KeyPair) -> None:
    set_secret_line(d / "cell.key_secret", pair.secret[:39])


def _repeated_secret(d: Path, pair: KeyPair) -> None:
    path = d / "cell.key_secret"
    path.write_text(path.read_text() + f'    secret-key = "{pair.secret}"\n')


def _other_public(d: Path, _: KeyPair) -> None:
    other = generate_keypair(d / "other", NAME)
    (d / "cell.key").write_bytes((other.secret_path.parent / "cell.key").read_bytes())


def _other_public_inside_secret(d: Path, pair: KeyPair) -> None:
    other_public = zmq.curve_keypair()[0].decode()
    path = d / "cell.key_secret"
    path.write_text(path.read_text().replace(pair.public, other_public))


REGENERATE = "regenerate the pair with `zcells keys gen cell --dir {d} --force`"
CREATE = "create it with `zcells keys gen cell --dir {d}`"

LOAD_FAILURES = [
    pytest.param(_dir_open, "", "run `chmod 700 {d}`", "0755", id="dir-0755"),
    pytest.param(_secret_open, "cell.key_secret", "run `chmod 600 {p}`", "0644", id="secret-0644"),
    pytest.param(_secret_missing, "cell.key_secret", CREATE, "no such", id="secret-missing"),
    pytest.param(
        _secret_missing_in_open_dir, "cell.key_secret", CREATE, "no such", id="missing-in-tmp"
    ),
    pytest.param(_dir_missing, "", CREATE, "no such keys directory", id="dir-missing"),
    pytest.param(_garbage, "cell.key_secret", REGENERATE, "no secret-key line", id="garbage"),
    pytest.param(_not_utf8, "cell.key_secret", REGENERATE, "not UTF-8", id="not-utf8"),
    pytest.param(_bad_z85, "cell.key_secret", REGENERATE, "not 40-character Z85", id="bad-z85"),
    pytest.param(_overflowing_z85, "cell.key_secret", REGENERATE, "Z85", id="z85-overflow"),
    pytest.param(_short_secret, "cell.key_secret", REGENERATE, "Z85", id="short-secret"),
    pytest.param(_repeated_secret, "cell.key_secret", REGENERATE, "repeated", id="repeated"),
    pytest.param(_other_public, "cell.key", REGENERATE, "does not match", id="mismatch"),
    pytest.param(
        _other_public_inside_secret, "cell.key_secret", REGENERATE, "does not match", id="inner"
    ),
]


@pytest.mark.parametrize(("breakage", "where", "fix", "problem"), LOAD_FAILURES)
def test_load_keypair_failures(
    keys_dir: Path,
    pair: KeyPair,
    breakage: Callable[[Path, KeyPair], None],
    where: str,
    fix: str,
    problem: str,
) -> None:
    path = keys_dir / where if where else keys_dir
    breakage(keys_dir, pair)
    with pytest.raises(KeyFileError) as caught:
        load_keypair(keys_dir, NAME)
    message = str(caught.value)
    assert caught.value.path == str(path)
    assert str(path) in message
    assert fix.format(d=keys_dir, p=path) in message
    assert problem in message
    assert pair.secret not in message
    for bad in ("~" + "a" * 39, "#" * 40, pair.secret[:39]):
        assert bad not in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_load_keypair_refuses_a_secret_owned_by_someone_else(keys_dir: Path, pair: KeyPair) -> None:
    os.chown(pair.secret_path, 65534, -1)
    with pytest.raises(KeyFileError, match="owned by uid 65534") as caught:
        load_keypair(keys_dir, NAME)
    assert f"chown {os.geteuid()} {pair.secret_path}" in str(caught.value)
    assert pair.secret not in str(caught.value)


# --- check_public_key ---------------------------------------------------------------


def test_check_public_key_accepts_a_real_key(pair: KeyPair) -> None:
    assert check_public_key(pair.public) is pair.public
    fresh = zmq.curve_keypair()[0].decode()
    assert check_public_key(fresh, "neighbour key") == fresh


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a" * 39,
        "a" * 41,
        '"' + "a" * 39,
        "~" + "a" * 39,
        " " + "a" * 39,
        "_" + "a" * 39,
        "é" + "a" * 39,
        "#" * 40,
        None,
        b"a" * 40,
        40,
    ],
)
def test_check_public_key_rejects(bad: object) -> None:
    with pytest.raises(ValidationError) as caught:
        check_public_key(bad, "neighbour key")  # type: ignore[arg-type]
    assert caught.value.field == "neighbour key"
    assert "40-character Z85 CURVE public key" in str(caught.value)
    assert "zcells keys gen" in str(caught.value)


Z85_ALPHABET = (
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


@pytest.mark.parametrize("char", list(Z85_ALPHABET))
def test_check_public_key_accepts_every_z85_character(char: str) -> None:
    candidate = "0" * 39 + char  # the last 5-char block stays far below 2**32
    assert check_public_key(candidate) == candidate


# --- check_environment ----------------------------------------------------------------


def test_check_environment_passes_here() -> None:
    check_environment()


def test_check_environment_old_libzmq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 4))
    with pytest.raises(EnvironmentMismatch, match=r"libzmq 4\.3\.4 found, 4\.3\.5 or newer"):
        check_environment()


def test_check_environment_without_curve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zmq, "has", lambda capability: capability != "curve")
    with pytest.raises(EnvironmentMismatch, match="CURVE"):
        check_environment()


def test_check_environment_old_msgpack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(msgpack, "version", (1, 0, 8))
    with pytest.raises(EnvironmentMismatch, match=r"msgpack 1\.0\.8 found, 1\.2\.1 or newer"):
        check_environment()


def test_suffixes() -> None:
    assert keys.KEY_SUFFIX == ".key"
    assert keys.SECRET_SUFFIX == ".key_secret"
