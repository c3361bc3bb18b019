"""Who a caller is and what that lets them share: agent passwords, sign-in throttling, API keys and the
prefix-cache salt of each tenant.

Passwords are stored as `scrypt:<n>:<r>:<p>:<salt b64>:<hash b64>` (`specdesk hash-password` prints one);
plain and legacy `sha256:<hex>` entries are still accepted, and the server warns about them at start.

Cache salts keep the prefix cache from becoming a side channel: a request whose prompt starts like
another tenant's would otherwise be served from that tenant's pages, and `cached_tokens` (or a faster
first token) would tell the caller what someone else sent. Every tenant gets its own salt (each API key,
each console agent), so pages are shared only within a tenant. Salts are derived from the key, never the
key itself, so the engine's memory never holds a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable

SCRYPT_PREFIX = "scrypt:"
SHA256_PREFIX = "sha256:"
# 32 MiB and roughly a tenth of a second per check: slow for a guesser, unnoticed by an agent signing in.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16  # a stored entry may not make one check cost more than this


# ---- passwords ------------------------------------------------------------------------------------
def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash line for an agents file: `scrypt:<n>:<r>:<p>:<salt b64>:<hash b64>`."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, n, r, p, 32)
    b64 = base64.b64encode
    return f"{SCRYPT_PREFIX}{n}:{r}:{p}:{b64(salt).decode()}:{b64(digest).decode()}"


def check_password_entry(entry: str) -> None:
    """ValueError when a stored entry says scrypt or sha256 but cannot be read (caught at start)."""
    if entry.startswith(SCRYPT_PREFIX):
        _parse_scrypt(entry)
    elif entry.startswith(SHA256_PREFIX):
        digest = entry[len(SHA256_PREFIX) :]
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ValueError("a sha256: entry needs 64 hex digits")


def is_weak_entry(entry: str) -> bool:
    """True for plain and unsalted sha256 entries: accepted, but a stolen file gives them away."""
    return not entry.startswith(SCRYPT_PREFIX)


def verify_password(password: str, entry: str | None) -> bool:
    """Check `password` against a stored entry in constant time for its kind. `entry=None` (no such
    agent) runs a scrypt check all the same, so an unknown name takes as long as a wrong password."""
    if entry is None:
        _scrypt(password, b"specdesk-no-such-agent", SCRYPT_N, SCRYPT_R, SCRYPT_P, 32)
        return False
    if entry.startswith(SCRYPT_PREFIX):
        n, r, p, salt, expected = _parse_scrypt(entry)
        return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(expected)), expected)
    if entry.startswith(SHA256_PREFIX):
        digest = hashlib.sha256(password.encode("utf-8", "surrogatepass")).hexdigest()
        return hmac.compare_digest(digest, entry[len(SHA256_PREFIX) :].lower())
    return hmac.compare_digest(password.encode("utf-8", "surrogatepass"), entry.encode("utf-8", "surrogatepass"))


def _parse_scrypt(entry: str) -> tuple[int, int, int, bytes, bytes]:
    parts = entry[len(SCRYPT_PREFIX) :].split(":")
    try:
        n, r, p = (int(x) for x in parts[:3])
        salt, digest = (base64.b64decode(x, validate=True) for x in parts[3:])
    except (ValueError, binascii.Error):
        raise ValueError("a scrypt: entry needs n:r:p:salt:hash (salt and hash in base64)") from None
    if len(parts) != 5 or n < 2 or n & (n - 1) or n > _MAX_N or not 0 < r <= _MAX_R or not 0 < p <= _MAX_P:
        raise ValueError(f"a scrypt: entry needs n a power of 2 up to {_MAX_N}, r <= {_MAX_R}, p <= {_MAX_P}")
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("a scrypt: entry needs a salt of 8+ bytes and a hash of 16+ bytes")
    return n, r, p, salt, digest


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    secret = password.encode("utf-8", "surrogatepass")
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n + 2**20, dklen=length)


# ---- sign-in throttling ---------------------------------------------------------------------------
class LoginThrottle:
    """Refuse sign-in attempts for a user name or a client address that failed `max_failures` times
    within the last `window_s` seconds. Thread-safe; memory is bounded by `max_keys` (oldest dropped).

    Locking by name lets anyone lock a name out for one window by guessing wrong on purpose: the
    price of stopping a slow guesser who spreads attempts over many addresses.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, max_keys: int = 10_000) -> None:
        self.max_failures, self.window_s, self.max_keys = max_failures, window_s, max_keys
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, keys: Iterable[str], now: float | None = None) -> float | None:
        """Seconds until the first of `keys` may try again, or None when none of them is locked."""
        now = time.monotonic() if now is None else now
        waits = []
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                if len(times) >= self.max_failures:
                    waits.append(times[-self.max_failures] + self.window_s - now)
        return max(waits) if waits else None

    def record_failure(self, keys: Iterable[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                times.append(now)
                self._failures[key] = times
                while len(self._failures) > self.max_keys:
                    del self._failures[next(iter(self._failures))]

    def clear(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.pop(key, deque())  # re-inserted by the caller: dict order = recency
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if times:
            self._failures[key] = times
        return times


# ---- API keys and cache salts ---------------------------------------------------------------------
def api_key_cache_salt(key: str) -> str:
    """The prefix-cache tenant of one API key: a digest, so the key itself never reaches the engine."""
    return "api:" + hashlib.sha256(b"specdesk cache salt\0" + key.encode("utf-8")).hexdigest()[:32]


OPEN_API_CACHE_SALT = "api:open"  # every /v1 caller of a server without keys: one tenant


def console_cache_salt(agent: str | None) -> str:
    """The salt the console passes to `llm.submit` for a turn of `agent` (the signed-in name; None with
    logins off). Each agent shares cached pages only with their own earlier turns."""
    if not agent:
        return "console"
    return "console:" + hashlib.sha256(b"specdesk console agent\0" + agent.encode("utf-8")).hexdigest()[:32]


def tenant_cache_salt(tenant: str, client_salt: str | None) -> str:
    """A client's own `cache_salt` narrows sharing within its tenant; it can never reach another one.
    Tenant salts contain no '/', so the combination cannot be spelled from another tenant."""
    return tenant if client_salt is None else f"{tenant}/{client_salt}"


class ApiKeys:
    """The configured API keys, read once at start, and the cache salt each one maps to."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._salts = {k.encode("utf-8"): api_key_cache_salt(k) for k in keys if k}

    def __bool__(self) -> bool:
        return bool(self._salts)

    def tenant(self, authorization: str | None) -> str | None:
        """The cache salt for an `Authorization: Bearer <key>` header; None when the key is wrong or
        missing. With no keys configured everyone is the one open tenant."""
        if not self._salts:
            return OPEN_API_CACHE_SALT
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode("utf-8", "surrogatepass")
        found = None
        for key, salt in self._salts.items():  # compare with every key: no timing hint about which matched
            if hmac.compare_digest(given, key):
                found = salt
        return found if scheme.lower() == "bearer" else None
