"""The encoder that embeds uploaded query images, built once per server process and model.

`searcher.embed_queries` builds the model on every call (seconds for a ViT); the server
builds it once per model_version the index records and keeps it. The uploaded bytes pass
the embed job's decode guards: the default format allowlist (no EPS), the pixel limit
checked from the header before any pixel is decoded, EXIF orientation, alpha on white.
"""
from __future__ import annotations

import threading

from .requests import RequestError


class QueryEncoder:
    def __init__(self, encoder: dict, *, max_pixels: int):
        """encoder: the manifest's `encoder` record ({"spec": ..., "model_version": ...});
        max_pixels: the serving pixel limit of an upload."""
        from sparse_embed.pipeline.embed.actor import EmbedActor
        from sparse_embed.pipeline.embed.decode import ResizePlan

        self.model_version = encoder["model_version"]
        self.max_pixels = max_pixels
        self.actor = EmbedActor(spec=encoder["spec"], expected_version=encoder["model_version"])  # fp32 here, no Ray
        self.plan = ResizePlan.from_data_config(self.actor.encoder.data_config)

    def pixels(self, data: bytes) -> bytes:
        """Decoded, resized and cropped like an embedded object; refusals as RequestError."""
        from sparse_embed.pipeline.embed.decode import (ALLOWED_FORMATS, DecodeError, DecompressionBomb, NotAnImage,
                                                        UnsupportedFormat, decode_image)

        try:
            return decode_image(data, self.plan, formats=ALLOWED_FORMATS, max_pixels=self.max_pixels)[0].tobytes()
        except UnsupportedFormat as e:
            raise RequestError(415, f"The upload is {e.detected}, which this server does not decode: send one of "
                                    f"{', '.join(ALLOWED_FORMATS)}") from None
        except NotAnImage:
            raise RequestError(415, f"The upload is not an image this server reads: send one of "
                                    f"{', '.join(ALLOWED_FORMATS)}") from None
        except DecompressionBomb as e:
            raise RequestError(413, f"The upload has too many pixels ({e}; this server decodes at most "
                                    f"{self.max_pixels:,}): send a smaller image") from None
        except DecodeError as e:
            raise RequestError(400, f"The upload could not be decoded ({e}): send a complete image file") from None

    def embed(self, data: bytes):
        """Image bytes -> (1, D) float32, L2-normalised, as the index's rows were embedded."""
        import numpy as np

        return np.asarray(self.actor.embed_pixels([self.pixels(data)]), dtype="float32")


class QueryEncoders:
    """One QueryEncoder per model_version, built on first use (thread-safe)."""

    def __init__(self, *, max_pixels: int):
        self.max_pixels = max_pixels
        self._by_version: dict[str, QueryEncoder] = {}
        self._lock = threading.Lock()

    def for_manifest(self, manifest: dict) -> QueryEncoder:
        encoder = manifest.get("encoder")
        if not encoder:
            raise RequestError(409, "This index records no encoder, so uploaded images cannot be embedded: search by "
                                    "image_id, or rebuild the index from an embed run")
        with self._lock:
            if encoder["model_version"] not in self._by_version:
                self._by_version = {encoder["model_version"]: QueryEncoder(encoder, max_pixels=self.max_pixels)}  # the old model is let go
            return self._by_version[encoder["model_version"]]
