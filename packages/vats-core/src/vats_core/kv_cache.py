"""Key/value caches for incremental decoding: a preallocated static cache and a rolling
ring buffer for sliding-window layers.

The model knows nothing of generation (gpt-fast style): generation code builds one cache per
layer with :meth:`KVCaches.for_layers` and passes ``caches[i]`` to layer ``i``. Each
:class:`~vats_core.attention.layer.Attention` layer then does::

    k_all, v_all, key_padding_mask = cache.update(k, v, key_padding_mask)
    out = attention(q, k_all, v_all, causal=True, window=window, key_padding_mask=key_padding_mask)

``update`` returns the keys in chronological order with the new chunk last, so the
dispatch's bottom-right causal alignment (query ``i`` of ``Tq`` sits at key ``i + Tk - Tq``)
and its window rule are exact for prefill, chunked prefill and one-token decoding alike.

Left-padded batches: the caller passes the key padding mask of each new chunk (True = real
token); the cache keeps it per slot and returns the mask over everything it holds. Rows'
RoPE positions are the model's job (:meth:`StaticKVCache.seq_lens` tells it how many real
tokens each row already has).

Two ways to return what attention sees. By default ``update`` returns only the tokens held
(a static cache's filled prefix), so eager decoding attends over exactly the keys there
are; the returned length grows with every step. Built with ``fixed_shape=True`` (for a
decode step under ``torch.compile``, as gpt-fast does), a one-token ``update`` instead
returns the whole buffer, the same shape every step, with a mask that hides the slots not
written yet: the compiled step then traces once and never recompiles as the caches fill or
a ring buffer wraps. The write position is a tensor (:attr:`KVCache.pos`), so no Python
integer that changes per step enters the graph's shapes. Prefill chunks (more than one
token) take the default path either way.

Shapes: B batch, Hkv key/value heads, T new tokens, L cache capacity, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["KVCache", "KVCaches", "RollingKVCache", "StaticKVCache"]


class KVCache(nn.Module):
    """Common interface of the per-layer caches (buffers are non-persistent: caches never
    enter a state dict, yet ``.to(device)`` moves them)."""

    def __init__(
        self,
        *,
        batch_size: int,
        n_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
        fixed_shape: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("n_kv_heads", n_kv_heads),
            ("head_dim", head_dim),
        ):
            if value < 1:
                raise ValueError(f"{type(self).__name__}: {name}={value!r} must be >= 1")
        self.batch_size, self.n_kv_heads, self.head_dim = batch_size, n_kv_heads, head_dim
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # True = real token, per slot; only consulted once some chunk came with padding.
        self.register_buffer(
            "mask",
            torch.ones(batch_size, capacity, dtype=torch.bool, device=device),
            persistent=False,
        )
        # Real (non-padding) tokens written per row: the next RoPE position of each row.
        self.register_buffer(
            "n_real", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False
        )
        # Tokens written since the last reset (the next token's index). A tensor, so that a
        # compiled fixed-shape step reads no Python integer that changes every step (dynamo
        # would specialize on it and recompile); the default path also keeps it as an int.
        self.register_buffer(
            "pos", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )
        self._length = 0
        self._padded = False  # whether any chunk came with a key padding mask
        self.fixed_shape = bool(fixed_shape)

    @property
    def length(self) -> int:
        """Tokens written since the last reset (the next token's index). On a fixed-shape
        cache this reads :attr:`pos` from the device."""
        return int(self.pos) if self.fixed_shape else self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value
        self.pos.fill_(value)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append a chunk and return what attention over it must see.

        Args:
            k: ``(B, Hkv, T, Dh)`` new keys (already rotated by RoPE).
            v: ``(B, Hkv, T, Dh)`` new values.
            key_padding_mask: ``(B, T)`` bool, True = real token; None = all real.

        Returns:
            ``(k_all, v_all, mask)``: ``(B, Hkv, Tk, Dh)`` keys and values in chronological
            order ending with the new chunk, and their ``(B, Tk)`` padding mask, or None when
            no padding was ever written.
        """
        raise NotImplementedError

    def seq_lens(self) -> Tensor:
        """``(B,)`` long: real (non-padding) tokens written per row, i.e. each row's next
        RoPE position in a left-padded batch."""
        return self.n_real.clone()

    def reset(self) -> None:
        """Forget everything (buffers are kept, so no reallocation)."""
        self.length = 0
        self._padded = False
        self.mask.fill_(True)
        self.n_real.zero_()

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` tokens (e.g. to roll back rejected drafts)."""
        raise NotImplementedError

    def _check_chunk(self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
        name = type(self).__name__
        fixed = (self.batch_size, self.n_kv_heads, self.head_dim)
        if k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != fixed or v.shape != k.shape:
            raise ValueError(
                f"{name}.update expects k and v of shape (B={self.batch_size}, "
                f"Hkv={self.n_kv_heads}, T, Dh={self.head_dim}), got k {tuple(k.shape)} "
                f"and v {tuple(v.shape)}"
            )
        if k.dtype != self.k.dtype or v.dtype != self.k.dtype or k.device != self.k.device:
            raise ValueError(
                f"{name} holds {self.k.dtype} on {self.k.device}, got k {k.dtype} on {k.device} "
                f"and v {v.dtype}: build the cache with the model's dtype and device"
            )
        if key_padding_mask is not None and (
            key_padding_mask.dtype != torch.bool
            or tuple(key_padding_mask.shape) != (self.batch_size, k.shape[2])
        ):
            raise ValueError(
                f"{name}.update expects key_padding_mask as a bool (B, T) = "
                f"({self.batch_size}, {k.shape[2]}) tensor, got {key_padding_mask.dtype} "
                f"{tuple(key_padding_mask.shape)}"
            )

    def _chunk_mask(self, key_padding_mask: Tensor | None, t: int) -> Tensor:
        if key_padding_mask is None:
            return torch.ones(self.batch_size, t, dtype=torch.bool, device=self.k.device)
        return key_padding_mask

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, n_kv_heads={self.n_kv_heads}, "
            f"capacity={self.capacity}, head_dim={self.head_dim}, length={self.length}, "
            f"fixed_shape={self.fixed_shape}"
        )

    def _advance(self, t: int, key_padding_mask: Tensor | None) -> None:
        self.n_real += t if key_padding_mask is None else key_padding_mask.sum(dim=1)
        self.pos += t
        if not self.fixed_shape:
            self._length += t


class StaticKVCache(KVCache):
    """Preallocated ``(B, Hkv, max_len, Dh)`` keys and values for global-attention layers.

    ``update`` writes the chunk at ``[length, length + T)`` and returns views of the filled
    prefix, so attention sees exactly ``length`` keys (no masking of empty slots needed).
    With ``fixed_shape``, a one-token update returns all ``max_len`` slots and masks the
    unwritten ones (module docstring).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        fixed_shape: bool = False,
    ) -> None:
        if max_len < 1:
            raise ValueError(f"StaticKVCache: max_len={max_len!r} must be >= 1")
        super().__init__(
            batch_size=batch_size,
            n_kv_heads=n_kv_heads,
            capacity=max_len,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
            fixed_shape=fixed_shape,
        )

    def update(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        self._check_chunk(k, v, key_padding_mask)
        t = k.shape[2]
        if self.fixed_shape and t == 1:
            return self._update_fixed(k, v, key_padding_mask)
        start = self.length
        self._check_room(start, t)
        end = start + t
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        if key_padding_mask is not None or self._padded:
            self.mask[:, start:end] = self._chunk_mask(key_padding_mask, t)
            self._padded = True
        self._advance(t, key_padding_mask)
        mask = self.mask[:, :end] if self._padded else None
        return self.k[:, :, :end], self.v[:, :, :end], mask

    def _check_room(self, start: int, t: int) -> None:
        if start + t > self.capacity:
            raise ValueError(
                f"StaticKVCache is full: it holds {start} of max_len={self.capacity} tokens and "
                f"cannot take {t} more; build it with a larger max_len or reset() it"
            )

    def _update_fixed(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        # One token at slot pos; every slot returned, those past it masked. With Tq = 1 the
        # dispatch aligns the query with the last key, so causality is the mask's job.
        if not torch.compiler.is_compiling():  # (a host read: eager calls check the room)
            self._check_room(self.length, 1)
        slot = self.pos.view(1)
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        self.mask.index_copy_(1, slot, self._chunk_mask(key_padding_mask, 1))
        written = torch.arange(self.capacity, device=self.k.device) <= self.pos  # (L,)
        self._advance(1, key_padding_mask)
        return self.k, self.v, self.mask & written

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(
                f"StaticKVCache.crop(length={length}) needs 0 <= length <= {self.length} "
                "(the tokens it holds)"
            )
        self.length = length
        self.n_real.copy_(self.mask[:, :length].sum(dim=1))  # unwritten slots read True


class RollingKVCache(KVCache):
    """Ring buffer of the last ``window - 1`` keys/values, for causal sliding-window layers.

    Under the causal window rule (key ``j`` visible to query ``i`` iff ``i - window < j <= i``)
    the next query needs at most ``window - 1`` earlier keys, so memory is O(window) however
    many tokens are generated. Token ``p`` lives in slot ``p % (window - 1)``; ``update`` reads
    the held keys back in chronological order, appends the chunk, and returns the
    concatenation (at most ``window - 1 + T`` keys), so a prefill chunk longer than the window
    is still masked exactly. Only the chunk's last ``window - 1`` tokens are written back.

    With ``fixed_shape``, a one-token update returns the ``window - 1`` slots in slot order
    (unwritten ones masked) followed by the new token: ``window`` keys every step. Their
    order is not chronological, which changes nothing: every held key lies inside the
    window, so all of them are visible, and RoPE was applied before they were cached.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        n_kv_heads: int,
        window: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        fixed_shape: bool = False,
    ) -> None:
        if window < 1:
            raise ValueError(f"RollingKVCache: window={window!r} must be >= 1")
        super().__init__(
            batch_size=batch_size,
            n_kv_heads=n_kv_heads,
            capacity=window - 1,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
            fixed_shape=fixed_shape,
        )
        self.window = window

    def _held_slots(self) -> Tensor:
        """Slots of the held tokens, oldest first: ``(min(length, capacity),)`` long."""
        held = min(self.length, self.capacity)
        first = self.length - held
        return (first + torch.arange(held, device=self.k.device)) % max(self.capacity, 1)

    def update(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        self._check_chunk(k, v, key_padding_mask)
        t, cap = k.shape[2], self.capacity
        if self.fixed_shape and t == 1 and cap > 0:
            return self._update_fixed(k, v, key_padding_mask)
        padded = self._padded or key_padding_mask is not None
        chunk_mask = self._chunk_mask(key_padding_mask, t) if padded else None

        # 1. Read the held tokens back in chronological order and append the chunk.
        slots = self._held_slots()
        k_all = torch.cat([self.k.index_select(2, slots), k], dim=2)  # (B, Hkv, held + T, Dh)
        v_all = torch.cat([self.v.index_select(2, slots), v], dim=2)
        mask_all = (
            torch.cat([self.mask.index_select(1, slots), chunk_mask], dim=1) if padded else None
        )  # (B, held + T)

        # 2. Write back the chunk's last `cap` tokens; older ones would never be visible again.
        n_write = min(t, cap)
        if n_write > 0:
            write = (self.length + t - n_write + torch.arange(n_write, device=k.device)) % cap
            self.k.index_copy_(2, write, k[:, :, t - n_write :])
            self.v.index_copy_(2, write, v[:, :, t - n_write :])
            if padded:
                self.mask.index_copy_(1, write, chunk_mask[:, t - n_write :])
        self._padded = padded
        self._advance(t, key_padding_mask)
        return k_all, v_all, mask_all

    def _update_fixed(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        cap = self.capacity
        chunk_mask = self._chunk_mask(key_padding_mask, 1)
        written = torch.arange(cap, device=self.k.device) < self.pos  # (cap,); all once wrapped
        k_all = torch.cat([self.k, k], dim=2)  # (B, Hkv, cap + 1, Dh): held slots, then new
        v_all = torch.cat([self.v, v], dim=2)
        mask_all = torch.cat([self.mask & written, chunk_mask], dim=1)  # (B, cap + 1)
        slot = (self.pos % cap).view(1)  # the oldest token's slot: it leaves the window now
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        self.mask.index_copy_(1, slot, chunk_mask)
        self._advance(1, key_padding_mask)
        return k_all, v_all, mask_all

    def crop(self, length: int) -> None:
        # Tokens [length - cap, length) must still be held, i.e. nothing was evicted yet.
        if not 0 <= length <= self.length or (length < self.length and self.length > self.capacity):
            raise ValueError(
                f"RollingKVCache.crop(length={length}) is impossible: the cache has seen "
                f"{self.length} tokens and holds only the last {self.capacity}; it can crop "
                "only before it first wraps around"
            )
        if length == self.length:
            return
        self.length = length
        # Not wrapped yet: token p sits in slot p, and unwritten slots read True.
        self.n_real.copy_(self.mask[:, :length].sum(dim=1))

    def extra_repr(self) -> str:
        return f"window={self.window}, " + super().extra_repr()


class KVCaches(nn.ModuleList):
    """One cache per layer; index it with the layer number."""

    @classmethod
    def for_layers(
        cls,
        windows: Sequence[int | None],
        *,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        fixed_shape: bool = False,
    ) -> KVCaches:
        """Caches for layers with the given causal windows (None = global attention).

        A windowed layer gets a :class:`RollingKVCache` unless its window spans ``max_len``
        anyway, in which case the static cache is smaller. ``fixed_shape``: one-token
        updates return the same shapes every step (module docstring), for compiled decoding.
        """
        caches: list[KVCache] = []
        for window in windows:
            if window is None or window - 1 >= max_len:
                caches.append(
                    StaticKVCache(
                        batch_size=batch_size,
                        n_kv_heads=n_kv_heads,
                        max_len=max_len,
                        head_dim=head_dim,
                        dtype=dtype,
                        device=device,
                        fixed_shape=fixed_shape,
                    )
                )
            else:
                caches.append(
                    RollingKVCache(
                        batch_size=batch_size,
                        n_kv_heads=n_kv_heads,
                        window=window,
                        head_dim=head_dim,
                        dtype=dtype,
                        device=device,
                        fixed_shape=fixed_shape,
                    )
                )
        return cls(caches)

    @property
    def length(self) -> int:
        """Tokens written so far (the same for every layer)."""
        return self[0].length if len(self) else 0

    def reset(self) -> None:
        for cache in self:
            cache.reset()

    def crop(self, length: int) -> None:
        for cache in self:
            cache.crop(length)
