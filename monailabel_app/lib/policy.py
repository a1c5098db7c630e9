"""What the operator opens up, read from --conf at start-up (a bad value stops the server with one line).

--conf cors_origins    browser origins allowed to call the server, comma-separated
                       (http://localhost:3000,https://viewer.example.org, or * for any origin);
                       default: none. Credentials are never allowed cross-origin (no cookies are
                       used; MONAI Label's tokens travel in the Authorization header).
--conf allowed_hosts   host names clients may use to reach the server besides localhost, IP
                       addresses and this machine's name (DNS-rebinding guard); * for any
--conf allowed_clients addresses or networks of other machines allowed to call the server
                       (192.168.1.0/24,10.0.0.7, or * for any); default: this machine only.
                       Behind a reverse proxy on this machine, uvicorn reports the address the
                       proxy forwards (X-Forwarded-For): name the proxy's users here.
--conf max_upload_mb   largest request body of an upload (default 1024)
--conf max_image_mb    largest decoded image or label an upload may hold (default 2048)
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from msa.errors import MSAError

DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(value: str) -> str | None:
    """'scheme://host[:port]' as browsers send it in Origin (default port dropped); None if not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    suffix = f":{port}" if port is not None and port != DEFAULT_PORTS[parts.scheme] else ""
    return f"{parts.scheme}://{host.lower()}{suffix}"


def _split(value: str) -> list[str]:
    return [item for item in value.replace(",", " ").split() if item]


def _clients(value: str) -> tuple | None:
    networks = []
    for item in _split(value):
        if item == "*":
            return None
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise MSAError(f"--conf allowed_clients: {item!r} is not an IP address or network "
                           f"(e.g. 192.168.1.0/24)") from None
    return tuple(networks)


def _megabytes(conf: dict, key: str, default: float) -> int:
    raw = conf.get(key, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value < 2**40:
        raise MSAError(f"--conf {key} {raw!r}: give a size in MB greater than 0")
    return int(value * 2**20)


@dataclass(frozen=True)
class Policy:
    studies: Path
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = ()  # None: any
    max_upload_bytes: int = 1024 * 2**20
    max_image_bytes: int = 2048 * 2**20
    max_form_bytes: int = 2**20  # JSON and form bodies that carry no file

    @classmethod
    def from_conf(cls, conf: dict, studies: str, extra_origins: list | tuple = ()) -> Policy:
        origins = []
        for item in _split(str(conf.get("cors_origins", ""))) + [str(o) for o in extra_origins]:
            origin = "*" if item == "*" else normalize_origin(item)
            if origin is None:
                raise MSAError(f"--conf cors_origins: {item!r} is not an origin; give scheme://host[:port], "
                               f"e.g. http://localhost:3000")
            origins.append(origin)
        hosts = [h.lower().strip("[]") for h in _split(str(conf.get("allowed_hosts", "")))]
        hosts.append(socket.gethostname().lower())
        return cls(Path(studies).resolve(), tuple(dict.fromkeys(origins)), tuple(dict.fromkeys(hosts)),
                   _clients(str(conf.get("allowed_clients", ""))),
                   _megabytes(conf, "max_upload_mb", 1024), _megabytes(conf, "max_image_mb", 2048))

    def client_allowed(self, address: str | None) -> bool:
        """This machine always; other machines only from the networks the operator named."""
        if address is None or self.allowed_clients is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback):
            return True
        return any(ip in network for network in self.allowed_clients if network.version == ip.version)

    def origin_allowed(self, origin: str) -> bool:
        if "*" in self.cors_origins:
            return True
        normalized = normalize_origin(origin)
        return normalized is not None and normalized in self.cors_origins

    def host_allowed(self, host_header: str) -> bool:
        """A Host header naming this server: an IP address, localhost, or a name the operator allowed.
        (A web page that points its own DNS name at 127.0.0.1 sends its name here: refused.)"""
        if not host_header:
            return True  # HTTP/1.0 clients; browsers always send Host
        try:
            hostname = urlsplit(f"//{host_header}").hostname or ""
        except ValueError:
            return False
        if "*" in self.allowed_hosts or hostname == "localhost" or hostname.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(hostname)
            return True
        except ValueError:
            return hostname in self.allowed_hosts
