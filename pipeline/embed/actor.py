"""Stage 4: the embed actor. Ray Data calls it on batches; the model loads once per actor.

Rows that already failed upstream pass through untouched; if the model raises on a
batch, every row of that batch becomes an `embed` error row (the block still completes).

Each output row also carries `embed_actor` and `embed_seconds` (its share of the batch's
forward pass, host-to-device copy and result copy included; the copy back to the host
waits for the GPU): the sink sums them into the run report's busy fraction.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class EmbedActor:
    def __init__(self, *, spec: dict, expected_version: str | None = None, cpu_threads: int | None = None,
                 compile_batch: int | None = None):
        """compile_batch: torch.compile the model and compile it here, on a batch of this
        size, so a model that cannot compile fails the actor before any image is read."""
        import torch

        from sparse_embed.encoders import EncoderSpec, create_encoder

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
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.model = enc.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
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

    def embed_pixels(self, pixels: list[bytes]):
        """uint8 (3, H, W) byte strings -> (n, dim) float32 numpy, L2-normalised."""
        import numpy as np
        import torch

        n = len(pixels)
        step = self.compile_batch or max(n, 1)
        padded = -(-n // step) * step
        frame = 3 * self.height * self.width
        joined = bytearray(padded * frame)  # zeros: the padding rows stay zero
        for i, p in enumerate(pixels):  # each image is copied once, into the writable buffer torch reads
            joined[i * frame:(i + 1) * frame] = p
        x = torch.from_numpy(np.frombuffer(joined, dtype=np.uint8)).view(padded, 3, self.height, self.width)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.float().sub_(self.mean).div_(self.std)  # (n, 3, H, W), timm's Normalize on 0..255 input
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        with torch.inference_mode():
            for chunk in x.split(step):
                if self.device.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        outs.append(self.forward(chunk))
                else:
                    outs.append(self.forward(chunk))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out[:n].float().cpu().numpy()

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        stage = batch.column("error_stage").to_pylist()
        ok = [i for i, s in enumerate(stage) if s is None]
        n, dim = batch.num_rows, self.encoder.dim
        vectors = np.zeros((n, dim), dtype=np.float32)
        etypes = batch.column("error_type").to_pylist()
        messages = batch.column("error_message").to_pylist()
        started = time.perf_counter()
        if ok:
            pixels = batch.column("pixels").to_pylist()
            try:
                vectors[ok] = self.embed_pixels([pixels[i] for i in ok])
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
        out = batch.drop_columns(["pixels", "error_stage", "error_type", "error_message"])
        return (out
                .append_column("embedding", embedding)
                .append_column("model", pa.array([self.encoder.spec.model] * n, pa.string()))
                .append_column("model_version", pa.array([self.encoder.model_version] * n, pa.string()))
                .append_column("error_stage", pa.array(stage, pa.string()))
                .append_column("error_type", pa.array(etypes, pa.string()))
                .append_column("error_message", pa.array(messages, pa.string()))
                .append_column("embed_actor", pa.array([self.name] * n, pa.string()))
                .append_column("embed_seconds", pa.array(np.full(n, seconds / max(n, 1)), pa.float64())))
