"""Paged KV block allocator with reference counts and prefix caching of full blocks.

A block's hash chains the previous block's hash with its token ids, so equal hashes mean equal
prefixes. Freed blocks keep their hash until they are reused, which lets a later request with the
same prefix (the same system prompt, the previous chat turn) skip recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict

from transerve.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of_block: dict[int, int] = {}
        self.block_of_hash: dict[int, int] = {}
        # Free blocks in eviction order: least recently freed first. A dict keeps removal O(1).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        old_hash = self.hash_of_block.pop(block_id, None)
        if old_hash is not None and self.block_of_hash.get(old_hash) == block_id:
            del self.block_of_hash[old_hash]
        self.ref_counts[block_id] = 1
        return block_id

    def _block_hash(self, request: Request, i: int, prev_hash: int) -> int:
        start, end = i * self.block_size, (i + 1) * self.block_size
        key = (prev_hash, tuple(request.token_ids(start, end)))
        if request.multimodal is not None:
            # Image placeholder tokens are the same for every image: the images themselves are part of the key.
            key += request.multimodal.image_hashes_in(start, end)
        return hash(key)

    def allocate_cached_prefix(self, request: Request) -> None:
        """Attach the cached blocks that match the start of a fresh request's prompt.

        At least one prompt token is always left to compute, since its logits give the first output."""
        assert not request.block_ids and request.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        prev_hash = 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            block_hash = self._block_hash(request, i, prev_hash)
            block_id = self.block_of_hash.get(block_hash)
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                del self.free_block_ids[block_id]
            self.ref_counts[block_id] += 1
            request.block_ids.append(block_id)
            request.block_hashes.append(block_hash)
            prev_hash = block_hash
        request.num_computed_tokens = len(request.block_ids) * self.block_size
        if request.num_preemptions == 0:
            request.num_cached_tokens = request.num_computed_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens after those computed and in flight; False (and nothing
        changed) if blocks run out."""
        num_tokens = request.num_computed_tokens + request.num_in_flight_tokens + num_new_tokens
        if num_tokens <= len(request.block_ids) * self.block_size:  # most decodes: the last block has room
            return True
        needed = -(-num_tokens // self.block_size) - len(request.block_ids)
        if needed > len(self.free_block_ids):
            return False
        for _ in range(needed):
            request.block_ids.append(self._take_free_block())
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        prev_hash = request.block_hashes[-1] if request.block_hashes else 0
        for i in range(len(request.block_hashes), num_full):
            block_hash = self._block_hash(request, i, prev_hash)
            block_id = request.block_ids[i]
            request.block_hashes.append(block_hash)
            if block_hash not in self.block_of_hash:
                self.block_of_hash[block_hash] = block_id
                self.hash_of_block[block_id] = block_hash
            prev_hash = block_hash

    def free(self, request: Request) -> None:
        """Release the request's blocks, last first, so a prefix's tail is evicted before its head."""
        for block_id in reversed(request.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids[block_id] = None
        request.block_ids.clear()
        request.block_hashes.clear()
        request.num_computed_tokens = 0
