"""Who may talk to the node, and over what: the calling-AE / host allow-lists and the TLS contexts.

Why this matters: the node forwards what it receives to a PACS under its own AE title, which that PACS trusts. A node
that accepted any sender would let anyone on the network push images into the PACS. So:

- the node listens on 127.0.0.1 unless a host is given, and refuses to listen beyond loopback without a calling-AE
  allow-list (``--allow-aet``); ``--allow-host`` (addresses or networks) narrows it further;
- an association from a calling AE title (or address) not on the lists is rejected (A-ASSOCIATE-RJ, permanent,
  "calling AE title not recognised" / "no reason given" for an address);
- TLS (``--tls-cert``/``--tls-key``, optionally ``--tls-ca`` to require client certificates) for the server and
  (``--forward-tls-ca`` ...) for the C-STORE out, on Python's :mod:`ssl` through pynetdicom's ``ssl_context``.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from typing import Optional, Sequence

#: A-ASSOCIATE-RJ parameters (PS3.8 9.3.4): rejected-permanent, by the service user, and the reason
REJECT_PERMANENT, SOURCE_SERVICE_USER = 0x01, 0x01
NO_REASON_GIVEN, CALLING_AE_NOT_RECOGNISED = 0x01, 0x03


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: only this machine can connect there."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def parse_networks(entries: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``--allow-host`` values (``10.0.0.5`` or ``10.0.0.0/24``) -> networks; ValueError naming a bad one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--allow-host {entry!r}: not an IP address or network (e.g. 10.0.0.5 or "
                             f"10.0.0.0/24)") from None
    return networks


@dataclass(frozen=True)
class AccessRules:
    """The allow-lists; an empty list allows everything of its kind (only possible on loopback)."""

    calling_ae_titles: tuple[str, ...] = ()
    networks: tuple = field(default_factory=tuple)

    def refusal(self, calling_ae_title: str, address: str) -> Optional[tuple[int, str]]:
        """None if the peer is allowed, else ``(A-ASSOCIATE-RJ diagnostic, reason for the log)``."""
        if self.calling_ae_titles and calling_ae_title.strip() not in self.calling_ae_titles:
            return CALLING_AE_NOT_RECOGNISED, "calling AE title not on --allow-aet"
        if self.networks:
            try:
                peer = ipaddress.ip_address(address)
            except ValueError:
                return NO_REASON_GIVEN, "address not on --allow-host"
            if not any(peer in network for network in self.networks):
                return NO_REASON_GIVEN, "address not on --allow-host"
        return None


def exposure_problem(host: str, rules: AccessRules) -> Optional[str]:
    """Why the node must not start listening on ``host`` with ``rules`` (None: fine)."""
    if not is_loopback(host) and not rules.calling_ae_titles:
        return (f"--host {host} listens beyond this machine: pass --allow-aet TITLE (the calling AE titles of your "
                f"scanners/PACS) so that not everyone on the network can send images through the node")
    return None


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do their TLS handshake in the association's own thread.

    pynetdicom wraps each accepted socket inside its accept loop; with the default handshake-on-wrap, one client that
    connects and says nothing would stall every other connection. Deferred, the handshake happens on the first read
    in the association thread, where the node's timeouts apply.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,  # type: ignore[override]
                    *args, **kwargs):
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def server_tls_context(cert: str, key: str, client_ca: Optional[str] = None) -> ssl.SSLContext:
    """TLS for the listening side; with ``client_ca``, clients must present a certificate signed by it."""
    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context.load_cert_chain, "--tls-cert/--tls-key", cert, key)
    if client_ca:
        _load(context.load_verify_locations, "--tls-ca", client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(ca: str, cert: Optional[str] = None, key: Optional[str] = None) -> ssl.SSLContext:
    """TLS for forwarding: the destination's certificate must chain to ``ca`` and match its host name; with
    ``cert``/``key`` the node presents its own certificate (a PACS that requires client certificates)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context.load_verify_locations, "--forward-tls-ca", ca)
    if cert or key:
        if not (cert and key):
            raise ValueError("--forward-tls-cert and --forward-tls-key go together")
        _load(context.load_cert_chain, "--forward-tls-cert/--forward-tls-key", cert, key)
    return context


def _load(method, option: str, *paths: str) -> None:
    try:
        method(*paths)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ValueError(f"{option} {' '.join(paths)}: cannot use as TLS certificate/key ({reason})") from None
