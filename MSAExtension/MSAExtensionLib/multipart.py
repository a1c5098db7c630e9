"""multipart/form-data in both directions, with the standard library only (Slicer's Python has no
`requests`): request bodies for uploads and form fields, and MONAI Label's multipart answers."""

from __future__ import annotations

import email.parser
import email.policy
import uuid


def encode(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """Form fields and files ({name: (filename, content)}) -> (body, content type header value)."""
    boundary = f"msa-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + value.encode() + b"\r\n")
    for name, (filename, content) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def decode(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """A multipart answer -> {field name: (filename or None, content bytes)}."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise ValueError("the answer is not multipart")
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        parts[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return parts
