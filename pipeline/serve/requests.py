"""What a request may ask for, as pure functions: the search query (upload, image_id or URI),
k, an image_id in a path, the upload size. Each refusal is a RequestError with the HTTP
status and one sentence naming the cause and the fix; nothing here touches the index."""
from __future__ import annotations

from dataclasses import dataclass

MAX_K = 200  # results per search; a page of 200 thumbnails is already more than a screen
DEFAULT_K = 24
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
INT64_MAX = 2 ** 63 - 1


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status, the message says why in words."""

    def __init__(self, status: int, message: str, *, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class SearchQuery:
    """Exactly one of upload, image_id, uri is set."""

    k: int
    upload: bytes | None = None
    image_id: int | None = None
    uri: str | None = None

    @property
    def kind(self) -> str:
        return "upload" if self.upload is not None else "image_id" if self.image_id is not None else "uri"


def parse_k(value, *, max_k: int = MAX_K) -> int:
    """k from a form or JSON value (None: DEFAULT_K, capped at max_k); 400 outside 1..max_k."""
    if value is None or value == "":
        return min(DEFAULT_K, max_k)
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise RequestError(400, f"Expected k to be a whole number from 1 to {max_k}, got {value!r}")
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"Expected k to be a whole number from 1 to {max_k}, got {value!r}") from None
    if not 1 <= k <= max_k:
        raise RequestError(400, f"Expected k from 1 to {max_k}, got {k}")
    return k


def parse_image_id(value) -> int:
    """An image_id from a path segment, form field or JSON value; 400 unless a non-negative int64."""
    if isinstance(value, bool) or isinstance(value, float):
        raise RequestError(400, f"Expected image_id to be a whole number >= 0, got {value!r}")
    text = str(value).strip() if value is not None else ""
    if not text.isdigit() or not text.isascii():
        raise RequestError(400, f"Expected image_id to be a whole number >= 0, got {value!r}")
    image_id = int(text)
    if image_id > INT64_MAX:
        raise RequestError(400, f"Expected image_id below 2^63, got {text}")
    return image_id


def check_upload_size(n_bytes: int | None, limit: int, *, slack: int = 0) -> None:
    """413 when an upload has (or its request declares) more than `limit` bytes; `slack`
    allows for a request's multipart framing around the file."""
    if n_bytes is not None and n_bytes > limit + slack:
        raise RequestError(413, f"The upload is {n_bytes:,} bytes, over this server's limit of {limit:,} bytes "
                                f"({limit / 2 ** 20:.3g} MiB): send a smaller image, or start the server with a larger "
                                f"--max-upload-mb")


def search_query(fields: dict, *, max_k: int = MAX_K, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> SearchQuery:
    """The fields of a search request (JSON object or form: `image` bytes, `image_id`, `uri`,
    `k`) -> SearchQuery; 400 unless exactly one of image, image_id, uri is given."""
    if not isinstance(fields, dict):
        raise RequestError(400, f"Expected a JSON object with one of image_id or uri (and k), got {type(fields).__name__}")
    unknown = sorted(set(fields) - {"image", "image_id", "uri", "k"})
    if unknown:
        raise RequestError(400, f"Expected fields image, image_id, uri and k, got unknown {', '.join(map(repr, unknown))}")
    given = [name for name in ("image", "image_id", "uri") if fields.get(name) not in (None, "", b"")]
    if len(given) != 1:
        raise RequestError(400, "Expected exactly one of an uploaded image, an image_id or a uri to search by, got "
                                + (" and ".join(given) if given else "none"))
    k = parse_k(fields.get("k"), max_k=max_k)
    if given[0] == "image":
        data = fields["image"]
        if not isinstance(data, (bytes, bytearray)):
            raise RequestError(400, "Expected the image as a file upload (multipart/form-data field 'image')")
        check_upload_size(len(data), max_upload_bytes)
        return SearchQuery(k=k, upload=bytes(data))
    if given[0] == "image_id":
        return SearchQuery(k=k, image_id=parse_image_id(fields["image_id"]))
    uri = fields["uri"]
    if not isinstance(uri, str) or len(uri) > 4096 or "\x00" in uri:
        raise RequestError(400, f"Expected uri to be the text of an indexed object's URI, got {str(uri)[:80]!r}")
    return SearchQuery(k=k, uri=uri.strip())
