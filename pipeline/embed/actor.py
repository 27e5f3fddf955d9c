"""Stage 4: the embed actor. Ray Data calls it on batches; the model loads once per actor.

Rows that already failed upstream pass through untouched; if the model raises on a
batch, every row of that batch becomes an `embed` error row (the block still completes).

Each output row also carries `embed_actor` and `embed_seconds` (its share of the batch's
forward pass, host-to-device copy and result copy included; the copy back to the host
waits for the GPU): the sink sums them into the run report's busy fraction.

With `decode="device"` the batches carry the objects' bytes (`data`, from
decode_device.fetch_batch) and the actor decodes them on its own device first
(decode_device.decode_batch); a row that fails there becomes a `decode` error row.

Precision comes from the spec (`precision`, part of model_version): bf16 autocasts on CUDA
and on CPU; fp16 needs CUDA, and an actor without it refuses to start (ValueError).
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # precision -> torch dtype name; fp32: no autocast


def autocast_for(precision: str, device_type: str):
    """The autocast context of a forward pass at `precision` on `device_type`.
    ValueError when this device cannot run it (fp16 without CUDA)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("Expected CUDA for --precision fp16 (CPU autocast runs bf16, not fp16): run on a GPU, or "
                         "use a table embedded with --precision bf16 or fp32")
    return torch.autocast(device_type, dtype=getattr(torch, AUTOCAST_DTYPES[precision]))


def has_conv(model) -> bool:
    """Whether `model` has 2-D convolutions beyond a patch-embedding stem (one Conv2d, as in
    ViTs): channels_last speeds convolutions up on CUDA, and only those."""
    import torch

    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


class EmbedActor:
    def __init__(self, *, spec: dict, expected_version: str | None = None, cpu_threads: int | None = None,
                 compile_batch: int | None = None, decode: str = "cpu", decode_options: dict | None = None):
        """compile_batch: torch.compile the model and compile it here, on a batch of this
        size, so a model that cannot compile fails the actor before any image is read.
        decode: "cpu" (batches carry decoded `pixels`) or "device" (they carry `data`, decoded
        here); decode_options: max_pixels and formats for the device path."""
        import torch

        from sparse_embed.encoders import EncoderSpec, create_encoder

        if decode not in ("cpu", "device"):
            raise ValueError(f"Expected decode 'cpu' or 'device', got {decode!r}")
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        enc = create_encoder(EncoderSpec.from_dict(spec))
        if expected_version and enc.model_version != expected_version:
            raise RuntimeError(
                f"Actor built model_version {enc.model_version}, the driver expected {expected_version}: "
                "the checkpoint changed during the run"
            )
        self.encoder = enc
        self.precision = enc.spec.precision
        autocast_for(self.precision, self.device.type)  # refuses fp16 without CUDA before any work
        self.decode, self.decode_options = decode, dict(decode_options or {})
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.model = enc.model.to(self.device)
        # channels_last: faster convolutions on CUDA; on ViTs (one patch conv) and on CPU it
        # only adds a layout copy per batch.
        self.channels_last = self.device.type == "cuda" and has_conv(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._staging = None  # a pinned host buffer reused by every batch (CUDA only)
        _, self.height, self.width = enc.data_config["input_size"]
        self.mean = torch.tensor(enc.data_config["mean"], device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(enc.data_config["std"], device=self.device).view(1, 3, 1, 1) * 255.0
        self.forward, self.compile_batch = self.model, compile_batch
        if compile_batch:
            # One static shape: batches are zero-padded (or split) to compile_batch rows, so a
            # short last batch never triggers a recompile.
            self.forward = torch.compile(self.model)
            try:
                self.embed_pixels([bytes(3 * self.height * self.width)])
            except Exception as e:
                raise RuntimeError(f"--compile: torch.compile failed on {spec.get('model')}: {type(e).__name__}: {e}") from e

    def _host_buffer(self, nbytes: int):
        """A writable uint8 host tensor of `nbytes`: on CUDA a pinned buffer kept across
        batches (pinning costs a page-locked allocation, so it is done once, not per batch)."""
        import torch

        if self.device.type != "cuda":
            return torch.zeros(nbytes, dtype=torch.uint8)
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        buf = self._staging[:nbytes]
        buf.zero_()
        return buf

    def embed_pixels(self, pixels: list[bytes]):
        """uint8 (3, H, W) byte strings -> (n, dim) float32 numpy, L2-normalised."""
        import numpy as np

        n = len(pixels)
        step = self.compile_batch or max(n, 1)
        padded = -(-n // step) * step
        frame = 3 * self.height * self.width
        host = self._host_buffer(padded * frame)  # zeros: the padding rows stay zero
        view = host.numpy()
        for i, p in enumerate(pixels):  # each image is copied once, into the buffer torch reads
            view[i * frame:(i + 1) * frame] = np.frombuffer(p, dtype=np.uint8)
        x = host.view(padded, 3, self.height, self.width)
        if self.device.type == "cuda":
            x = x.to(self.device, non_blocking=True)  # from pinned memory: an async copy
        return self.embed_tensor(x)[:n]

    def embed_tensor(self, x):
        """uint8 (n, 3, H, W) tensor (host or device) -> (n, dim) float32 numpy, L2-normalised.
        With compile_batch, n must be a multiple of it (embed_pixels pads)."""
        import torch

        n = x.shape[0]
        step = self.compile_batch or max(n, 1)
        if n % step:
            pad = torch.zeros((step - n % step, *x.shape[1:]), dtype=x.dtype, device=x.device)
            x = torch.cat([x, pad])
        x = x.to(self.device).float().sub_(self.mean).div_(self.std)  # (n, 3, H, W), timm's Normalize on 0..255 input
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        with torch.inference_mode(), autocast_for(self.precision, self.device.type):
            for chunk in x.split(step):
                outs.append(self.forward(chunk))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out[:n].float().cpu().numpy()

    def _decode_rows(self, datas: list, ok: list[int], stage, etypes, messages, widths, heights):
        """Decode the `data` of rows `ok` on this actor's device; failures become decode error
        rows. Returns (uint8 tensor of the decoded rows, their indices)."""
        from sparse_embed.pipeline.embed.decode import ResizePlan
        from sparse_embed.pipeline.embed.decode_device import decode_batch

        plan = ResizePlan.from_data_config(self.encoder.data_config)
        got = decode_batch([datas[i] for i in ok], plan, device=self.device, **self.decode_options)
        for j, e in got.errors.items():
            i = ok[j]
            stage[i], etypes[i], messages[i] = "decode", type(e).__name__, (str(e) or repr(e))[:1000]
        for j, (w, h) in got.sizes.items():
            widths[ok[j]], heights[ok[j]] = w, h
        return got.pixels, [ok[j] for j in got.ok]

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        stage = batch.column("error_stage").to_pylist()
        ok = [i for i, s in enumerate(stage) if s is None]
        n, dim = batch.num_rows, self.encoder.dim
        vectors = np.zeros((n, dim), dtype=np.float32)
        etypes = batch.column("error_type").to_pylist()
        messages = batch.column("error_message").to_pylist()
        widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
        on_device = "data" in batch.column_names
        pixels = x = None
        if ok and on_device:
            x, ok = self._decode_rows(batch.column("data").to_pylist(), ok, stage, etypes, messages, widths, heights)
        elif ok:
            pixels = batch.column("pixels").to_pylist()
        started = time.perf_counter()
        if ok:
            try:
                vectors[ok] = self.embed_tensor(x) if on_device else self.embed_pixels([pixels[i] for i in ok])
            except Exception as e:  # OOM, a kernel error: the rows fail, the block does not
                log.exception("embed failed on a batch of %d", len(ok))
                for i in ok:
                    stage[i], etypes[i], messages[i] = "embed", type(e).__name__, (str(e) or repr(e))[:1000]
                ok = []
        seconds = (time.perf_counter() - started) if n else 0.0
        valid = np.zeros(n, dtype=bool)
        valid[ok] = True
        flat = pa.array(vectors.reshape(-1), pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))
        drop = [c for c in ("pixels", "data", "width", "height", "error_stage", "error_type", "error_message")
                if c in batch.column_names]
        out = batch.drop_columns(drop)
        return (out
                .append_column("width", pa.array(widths, pa.int32()))
                .append_column("height", pa.array(heights, pa.int32()))
                .append_column("embedding", embedding)
                .append_column("model", pa.array([self.encoder.spec.model] * n, pa.string()))
                .append_column("model_version", pa.array([self.encoder.model_version] * n, pa.string()))
                .append_column("error_stage", pa.array(stage, pa.string()))
                .append_column("error_type", pa.array(etypes, pa.string()))
                .append_column("error_message", pa.array(messages, pa.string()))
                .append_column("embed_actor", pa.array([self.name] * n, pa.string()))
                .append_column("embed_seconds", pa.array(np.full(n, seconds / max(n, 1)), pa.float64())))
