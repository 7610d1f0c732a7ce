"""Tile schedule: which rows of the expert-sorted batch each row-tiled program owns.

Legend: N tokens, k slots per token, S = N*k rows, E experts, B = cdiv(S, BLOCK_M) + E programs.

Expert e owns rows offsets[e]:offsets[e+1] (RoutingPlan) and needs cdiv(counts[e], BLOCK_M) row
blocks; summed over experts that is at most cdiv(S, BLOCK_M) + E, so every kernel launches B
row blocks, a number known on the host without reading counts (no host synchronization). Block b
reads its (expert, first row, end row) from a small int32 table built with torch ops on the
device; blocks past the last one carry expert -1 and return at once. Dropped slots (has_dropped)
sit after offsets[-1] and belong to no block.

A row-tiled kernel launches B * cdiv(width, BLOCK_N) programs and maps its program id to (row
block, column tile) with `tile_of_program`: GROUP_M neighbouring row blocks sweep the column tiles
together, so a weight tile is read once per group of row blocks and the group's input rows stay
in L2 (the grouped ordering of Triton's matmul tutorial).

Reference (what the table holds), one Python step per expert:
    table = []
    for e in range(E):
        for start in range(offsets[e], offsets[e + 1], BLOCK_M):
            table.append((e, start, offsets[e + 1]))
    table += [(-1, 0, 0)] * (B - len(table))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP_M = 8  # row blocks that share each weight tile


@triton.jit
def tile_of_program(pid, num_blocks, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row block in 0..B-1, column tile in 0..num_n-1), grouped ordering."""
    per_group = GROUP_M * num_n
    first_block = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_blocks - first_block, GROUP_M)
    block = first_block + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return block, pid_n


@triton.jit
def rows_of_block(table_ptr, block, num_blocks, BLOCK_M: tl.constexpr):
    """Row block -> (int64 row ids [BLOCK_M], bool [BLOCK_M]: rows inside the block)."""
    row_start = tl.load(table_ptr + num_blocks + block)
    row_end = tl.load(table_ptr + 2 * num_blocks + block)
    rows = row_start + tl.arange(0, BLOCK_M)
    return rows.to(tl.int64), rows < row_end


def num_row_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """B = cdiv(S, BLOCK_M) + E: an upper bound on the row blocks of any routing."""
    return -(-num_rows // block_m) + num_experts


def tile_schedule_reference(offsets: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """The table by the loop in the module docstring (tests only): int32 [3, B]."""
    num_experts = offsets.numel() - 1
    bounds = offsets.tolist()
    table = [
        (e, start, bounds[e + 1])
        for e in range(num_experts)
        for start in range(bounds[e], bounds[e + 1], block_m)
    ]
    table += [(-1, 0, 0)] * (num_row_blocks(num_rows, num_experts, block_m) - len(table))
    return torch.tensor(table, dtype=torch.int32).reshape(-1, 3).t().contiguous()


def tile_schedule(counts: torch.Tensor, offsets: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """counts int64 [E], offsets int64 [E + 1] -> int32 [3, B]: rows expert, first row, end row.

    Torch ops only, no host synchronization; an entry with expert -1 marks an idle block.
    """
    num_experts = counts.numel()
    if num_rows >= 2**31:
        raise ValueError(f"the triton backend indexes rows in int32; got S = {num_rows} >= 2**31 rows")
    blocks = torch.div(counts + (block_m - 1), block_m, rounding_mode="floor")  # [E]
    block_end = torch.cumsum(blocks, 0)  # [E]: first block of expert e + 1 is block_end[e]
    block = torch.arange(num_row_blocks(num_rows, num_experts, block_m), device=counts.device)  # [B]
    expert = torch.searchsorted(block_end, block, right=True)  # [B] in 0..E; E = past the end
    safe = expert.clamp(max=num_experts - 1)
    first_block = block_end[safe] - blocks[safe]
    start = offsets[safe] + (block - first_block) * block_m
    idle = expert >= num_experts
    table = torch.stack([
        torch.where(idle, -1, expert),
        torch.where(idle, 0, start),
        torch.where(idle, 0, offsets[safe + 1]),
    ])
    return table.to(torch.int32)
