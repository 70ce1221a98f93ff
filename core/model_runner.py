"""The model runner: turns the scheduled requests into one flattened forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pegboard.core.models import load_model
from pegboard.sdk.slots import AttentionBackend
from pegboard.sdk.types import ForwardBatch, ModelInfo, Request


class ModelRunner:
    """Owns the loaded model and runs it on a `ForwardBatch` with the active attention backend.

    `prepare` lays the scheduled tokens out flat (ids, positions, KV slots) and `forward` runs
    the model and returns logits for the requests that sample this step. The runner never
    touches request bookkeeping: the engine advances `num_computed_tokens`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        progress: bool = True,
        load_format: str = "auto",
    ) -> None:
        loaded = load_model(model_dir, dtype, device, max_model_len, progress, load_format)
        self.model = loaded.model
        self.config = loaded.config
        self.info: ModelInfo = loaded.info
        self.device: torch.device = loaded.info.device
        self.attention: AttentionBackend | None = None

    def set_attention(self, backend: AttentionBackend) -> None:
        """Use `backend` from the next forward on (at start and after an attention swap)."""
        self.attention = backend

    def prepare(
        self, requests: list[Request], num_tokens: list[int], page_size: int
    ) -> ForwardBatch:
        """Flatten the next `num_tokens[i]` uncomputed tokens of each request into a batch.

        Each request's `page_table` must already cover `num_computed_tokens + n` tokens."""
        ids, positions, slots = [], [], []
        query_lens, seq_lens, page_tables, last_rows, samples = [], [], [], [], []
        end = 0
        for r, n in zip(requests, num_tokens):
            start, stop = r.num_computed_tokens, r.num_computed_tokens + n
            if n < 1 or stop > r.num_tokens:
                raise ValueError(
                    f"request {r.request_id}: cannot run {n} tokens from {start} "
                    f"(it has {r.num_tokens})"
                )
            num_pages = -(-stop // page_size)
            if len(r.page_table) < num_pages:
                raise ValueError(
                    f"request {r.request_id}: page_table has {len(r.page_table)} pages, "
                    f"{num_pages} are needed for {stop} tokens"
                )
            table = np.asarray(r.page_table[:num_pages], dtype=np.int64)
            pos = np.arange(start, stop, dtype=np.int64)
            ids.append(np.asarray(r.token_ids[start:stop], dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
            query_lens.append(n)
            seq_lens.append(stop)
            page_tables.append(r.page_table[:num_pages])
            end += n
            last_rows.append(end - 1)
            samples.append(stop == r.num_tokens)
        return ForwardBatch(
            requests=list(requests),
            input_ids=self._to_device(np.concatenate(ids)),
            positions=self._to_device(np.concatenate(positions)),
            slot_mapping=self._to_device(np.concatenate(slots)),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            page_tables_cpu=page_tables,
            logits_indices=self._to_device(np.asarray(last_rows, dtype=np.int64)),
            samples=samples,
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the model; float32 logits `[number of sampling requests, vocab]` in batch order."""
        if self.attention is None:
            raise RuntimeError("ModelRunner.set_attention must be called before forward")
        self.attention.prepare(batch)
        hidden = self.model(batch.input_ids, batch.positions, self.attention)
        if all(batch.samples):
            rows = batch.logits_indices
        else:
            rows = batch.logits_indices[[i for i, s in enumerate(batch.samples) if s]]
        return self.model.compute_logits(hidden[rows])

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor
