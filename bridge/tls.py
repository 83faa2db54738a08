"""TLS of the bridge's two client connections (wss:// and amqps://): verified unless ``--tls-insecure``.

One place builds the ``ssl.SSLContext`` for both, so that ``--ca-file`` and
``--tls-insecure`` mean the same for the stream and the broker. The AMQP URL's
own TLS options (``cafile``, ``certfile``, ``keyfile``) are honoured when the
flags do not say otherwise; its ``no_verify_ssl`` is refused by the settings
unless ``--tls-insecure`` is given (it used to turn verification off silently).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from bridge.errors import ConfigError
from bridge.secrets import host_port

if TYPE_CHECKING:
    from bridge.config import Settings

__all__ = [
    "amqp_connect_kwargs",
    "amqp_ssl_context",
    "check_files",
    "cleartext_remote",
    "is_loopback",
    "log_transport_warnings",
    "stream_ssl_context",
    "url_disables_verification",
]

log = logging.getLogger(__name__)


def url_disables_verification(url: str) -> bool:
    """Whether an AMQP URL asks aiormq not to verify the broker's certificate (``no_verify_ssl``)."""
    try:
        query = parse_qs(urlsplit(url).query)
    except ValueError:
        return False
    return any(value.strip() not in ("", "0") for value in query.get("no_verify_ssl", []))


def is_loopback(host: str) -> bool:
    """Whether a host name is this machine (``localhost`` or a loopback address)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def cleartext_remote(url: str) -> bool:
    """Whether a URL is unencrypted (``ws://``, ``amqp://``) and goes to another machine."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("ws", "amqp") and not is_loopback(parts.hostname or "")


def _context(settings: Settings, *, cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    # The messages name the file, which is not a secret; a key's content never shows.
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-file {cafile}: cannot load the CA bundle ({exc.strerror or exc})") from None
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--amqp-client-cert {certfile} / --amqp-client-key {keyfile or '(in the same file)'}: "
                f"cannot load the client certificate and key ({exc.strerror or exc})"
            ) from None
    if settings.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def stream_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of the ``wss://`` stream connection (None for ``ws://``).

    Raises:
        ConfigError: the CA file cannot be read.
    """
    if urlsplit(settings.stream_url).scheme != "wss":
        return None
    return _context(settings, cafile=settings.ca_file, certfile=None, keyfile=None)


def amqp_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of the ``amqps://`` connections (None when no node uses TLS).

    ``--ca-file``, ``--amqp-client-cert`` and ``--amqp-client-key`` win over the
    URL's ``cafile``, ``certfile`` and ``keyfile``.

    Raises:
        ConfigError: a CA, certificate or key file cannot be read.
    """
    tls_urls = [u for u in settings.amqp_nodes if urlsplit(u).scheme == "amqps"]
    if not tls_urls:
        return None
    query = parse_qs(urlsplit(tls_urls[0]).query)

    def first(name: str) -> str | None:
        values = query.get(name)
        return values[0] if values else None

    return _context(
        settings,
        cafile=settings.ca_file or first("cafile"),
        certfile=settings.amqp_client_cert or first("certfile"),
        keyfile=settings.amqp_client_key or first("keyfile"),
    )


def check_files(settings: Settings) -> None:
    """Load the CA and client certificate files now, so that a bad one fails at start (exit code 2).

    Raises:
        ConfigError: a file cannot be read or is not valid PEM.
    """
    if settings.ca_file or settings.amqp_client_cert or settings.amqp_client_key:
        # Every file given, whether a URL uses TLS yet or not (the stream's context loads a subset of these);
        # then the broker's own context, which may take files named in an amqps:// URL too.
        _context(settings, cafile=settings.ca_file, certfile=settings.amqp_client_cert,
                 keyfile=settings.amqp_client_key)  # fmt: skip
        amqp_ssl_context(settings)


def amqp_connect_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``aio_pika.connect``/``connect_robust``: the TLS context, if any."""
    context = amqp_ssl_context(settings)
    return {} if context is None else {"ssl_context": context}


def log_transport_warnings(settings: Settings) -> None:
    """Warn, at every start, about verification switched off and about traffic in clear to another host."""
    if settings.tls_insecure:
        log.warning(
            "TLS certificate verification is OFF (--tls-insecure): anyone on the path can read and change "
            "the stream and the broker traffic, including the realm key and the AMQP password"
        )
    for url in settings.amqp_nodes:
        if "0" in parse_qs(urlsplit(url).query).get("heartbeat", []):
            log.warning(
                "the broker URL for %s sets ?heartbeat=0: the AMQP heartbeat is off, so a link that goes silent "
                "(a partition, a dead proxy) is never noticed and events wait in the spool until TCP gives up; "
                "leave it out (the bridge sets 10 s) or set a number of seconds",
                host_port(url),
            )  # fmt: skip
    for url, what in ((settings.stream_url, "stream"), *((u, "broker") for u in settings.amqp_nodes)):
        if cleartext_remote(url):
            log.warning(
                "the %s connection to %s is not encrypted: its traffic (including credentials) is in clear; "
                "use %s://",
                what, host_port(url), "wss" if what == "stream" else "amqps",
            )  # fmt: skip
