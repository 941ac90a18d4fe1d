"""CURVE key files: generate them, read public keys, load a pair for the daemon.

A key pair NAME is two files in a keys directory, in the text format of pyzmq's
``zmq.auth.create_certificates`` (so ``zmq.auth.load_certificate`` reads them):
``NAME.key`` holds the public key (mode 0644, safe to hand out) and
``NAME.key_secret`` holds both keys (mode 0600). Rules kept here:

* The keys directory is 0700, the secret file 0600 and ours; `load_keypair`
  refuses anything looser rather than fixing it silently.
* Files are written to a fresh O_EXCL temporary file with their final mode
  (fchmod again, never trust the umask), fsynced, then renamed into place.
* The secret key text never appears in an error message, a repr or a log line.
"""

from __future__ import annotations

import os
import secrets
import stat
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import zmq
from zmq.utils import z85

from zcells.errors import EnvironmentMismatch, KeyFileError, ValidationError
from zcells.names import check_name

KEY_SUFFIX = ".key"
SECRET_SUFFIX = KEY_SUFFIX + "_secret"
MIN_LIBZMQ = (4, 3, 5)
MIN_MSGPACK = (1, 2, 1)

_Z85_CHARS = frozenset(z85.Z85CHARS.decode("ascii"))


@dataclass(frozen=True)
class KeyPair:
    """A loaded CURVE key pair; `secret` is kept out of the repr."""

    name: str
    public: str
    secret: str = field(repr=False)
    secret_path: Path


def _is_z85_key(value: object) -> bool:
    """True if `value` is a 40-character Z85 text that decodes to 32 bytes."""
    if not isinstance(value, str) or len(value) != 40 or not set(value) <= _Z85_CHARS:
        return False
    try:
        return len(z85.decode(value)) == 32
    except (ValueError, KeyError, struct.error):  # struct.error: a block above 2**32 - 1
        return False


def check_public_key(value: str, field: str = "public key") -> str:
    """Accept a 40-character Z85 CURVE public key and return it unchanged."""
    if not _is_z85_key(value):
        expected = "a 40-character Z85 CURVE public key (as printed by `zcells keys gen`)"
        raise ValidationError(field, value, expected)
    return value


def _gen(keys_dir: Path, name: str, *, force: bool = False) -> str:
    return f"`zcells keys gen {name} --dir {keys_dir}{' --force' if force else ''}`"


def _render(name: str, public: str, secret: str | None) -> str:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    banner = "Public Certificate" if secret is None else "**Secret** Certificate: never share it"
    text = f"#   ZeroMQ CURVE {banner}\n#   zcells key {name!r}, made {when}\n\nmetadata\ncurve\n"
    text += f'    public-key = "{public}"\n'
    return text if secret is None else text + f'    secret-key = "{secret}"\n'


def _write_atomic(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` through a fresh O_EXCL temporary file created with `mode`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with os.fdopen(os.open(tmp, flags, mode), "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed the 0644
            handle.write(text.encode("ascii"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        problem = f"cannot write key file ({exc.strerror})"
        raise KeyFileError(str(path), problem, "check the directory's owner and mode") from None


def _prepare_dir(keys_dir: Path) -> None:
    """Create `keys_dir` as 0700, or check that an existing one is closed to others."""
    try:
        keys_dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:  # (a file here fails later, when the key files are written)
        mode = stat.S_IMODE(os.stat(keys_dir).st_mode)
        if mode & 0o077:
            problem = f"directory is accessible by other users (mode {mode:04o})"
            raise KeyFileError(str(keys_dir), problem, f"run `chmod 700 {keys_dir}`") from None
    except OSError as exc:
        problem = f"cannot create keys directory ({exc.strerror})"
        raise KeyFileError(str(keys_dir), problem, "choose another --dir") from None
    else:
        os.chmod(keys_dir, 0o700)  # mkdir's mode went through the umask


def generate_keypair(keys_dir: Path, name: str, *, force: bool = False) -> KeyPair:
    """Create NAME.key (0644) and NAME.key_secret (0600) in `keys_dir` (0700)."""
    check_name("key name", name)
    _prepare_dir(keys_dir)
    public_path, secret_path = keys_dir / (name + KEY_SUFFIX), keys_dir / (name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if not force and (path.exists() or path.is_symlink()):
            raise KeyFileError(str(path), "key file already exists", "pass --force to replace it")
    public_raw, secret_raw = zmq.curve_keypair()
    public, secret = public_raw.decode("ascii"), secret_raw.decode("ascii")
    _write_atomic(secret_path, _render(name, public, secret), 0o600)
    _write_atomic(public_path, _render(name, public, None), 0o644)
    return KeyPair(name=name, public=public, secret=secret, secret_path=secret_path)


def _parse(path: Path, text: bytes, need: str, fix: str) -> dict[str, str]:
    """Pull `public-key` / `secret-key` out of a certificate, requiring a valid `need`.

    Problems name line numbers, never line contents: a line may hold the secret.
    """
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise KeyFileError(str(path), "corrupt key file: not UTF-8 text", fix) from None
    found: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        key, sep, value = raw.strip().partition("=")
        key = key.strip()
        if sep and key in ("public-key", "secret-key"):
            if key in found:
                problem = f"corrupt key file: {key} repeated on line {number}"
                raise KeyFileError(str(path), problem, fix)
            found[key] = value.strip(" \t'\"")
    if need not in found:
        raise KeyFileError(str(path), f"corrupt key file: no {need} line", fix)
    if not _is_z85_key(found[need]):
        raise KeyFileError(str(path), f"corrupt key file: {need} is not 40-character Z85", fix)
    return found


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(str(path), f"cannot read ({exc.strerror})", "check its owner") from None


def _secret_from(path: Path, text: bytes, fix: str) -> tuple[str, str]:
    """Return (derived public key, secret key) from a secret file's bytes."""
    fields = _parse(path, text, "secret-key", fix)
    secret = fields["secret-key"]
    public = zmq.curve_public(secret.encode("ascii")).decode("ascii")
    if fields.get("public-key", public) != public:
        raise KeyFileError(str(path), "its public-key does not match its secret-key", fix)
    return public, secret


def read_public_key(keys_dir: Path, name: str) -> str:
    """Return NAME's public key from NAME.key, or derived from NAME.key_secret."""
    check_name("key name", name)
    public_path, secret_path = keys_dir / (name + KEY_SUFFIX), keys_dir / (name + SECRET_SUFFIX)
    fix = f"regenerate the pair with {_gen(keys_dir, name, force=True)}"
    text = _read(public_path)
    if text is not None:
        return _parse(public_path, text, "public-key", fix)["public-key"]
    text = _read(secret_path)
    if text is not None:
        return _secret_from(secret_path, text, fix)[0]
    create = f"create it with {_gen(keys_dir, name)}"
    raise KeyFileError(str(public_path), "no such key file", create)


def load_keypair(keys_dir: Path, name: str) -> KeyPair:
    """Load NAME's pair for the daemon; refuse loose, foreign, corrupt or mismatched files."""
    check_name("key name", name)
    public_path, secret_path = keys_dir / (name + KEY_SUFFIX), keys_dir / (name + SECRET_SUFFIX)
    create = f"create it with {_gen(keys_dir, name)}"
    regenerate = f"regenerate the pair with {_gen(keys_dir, name, force=True)}"
    try:
        info = os.stat(keys_dir)
    except FileNotFoundError:
        raise KeyFileError(str(keys_dir), "no such keys directory", create) from None
    if not os.path.lexists(secret_path):  # a missing file first: /tmp's mode is beside the point
        raise KeyFileError(str(secret_path), "no such secret key file", create)
    if info.st_mode & 0o077:
        problem = f"directory is readable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
        raise KeyFileError(str(keys_dir), problem, f"run `chmod 700 {keys_dir}`")
    try:
        fd = os.open(secret_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(str(secret_path), "no such secret key file", create) from None
    except OSError as exc:
        problem = f"cannot open ({exc.strerror})"
        raise KeyFileError(str(secret_path), problem, "check its owner") from None
    with os.fdopen(fd, "rb") as handle:  # check the very file we read, not the path
        info = os.fstat(handle.fileno())
        mode, uid = stat.S_IMODE(info.st_mode), os.geteuid()
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(str(secret_path), "not a regular file", regenerate)
        if mode & 0o077:
            problem = f"secret key file is accessible by other users (mode {mode:04o})"
            raise KeyFileError(str(secret_path), problem, f"run `chmod 600 {secret_path}`")
        if info.st_uid != uid:
            problem = f"owned by uid {info.st_uid}, not by the current user (uid {uid})"
            fix = f"run `chown {uid} {secret_path}` or run zcells as its owner"
            raise KeyFileError(str(secret_path), problem, fix)
        text = handle.read()
    public, secret = _secret_from(secret_path, text, regenerate)
    on_disk = _read(public_path)  # optional for the daemon, but must agree when present
    fields = {} if on_disk is None else _parse(public_path, on_disk, "public-key", regenerate)
    if fields.get("public-key", public) != public:
        problem = f"public key does not match the secret key in {secret_path}"
        raise KeyFileError(str(public_path), problem, regenerate)
    return KeyPair(name=name, public=public, secret=secret, secret_path=secret_path)


def check_environment() -> None:
    """Raise EnvironmentMismatch unless libzmq (with CURVE) and msgpack are new enough."""
    problems: list[str] = []
    libzmq = tuple(zmq.zmq_version_info())
    checks = (("libzmq", libzmq, MIN_LIBZMQ), ("msgpack", tuple(msgpack.version), MIN_MSGPACK))
    for what, found, needed in checks:
        if found < needed:
            have, need = ".".join(map(str, found)), ".".join(map(str, needed))
            problems.append(f"{what} {have} found, {need} or newer needed")
    if not zmq.has("curve"):
        problems.append(f"libzmq {'.'.join(map(str, libzmq))} lacks CURVE security (needed)")
    if problems:
        raise EnvironmentMismatch("; ".join(problems))
