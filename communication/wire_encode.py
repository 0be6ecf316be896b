"""What the gRPC lane sends, encoded on the calling thread: the payload a rank serves of its shard and
the gradient slices a reduce-scatter pushes to each peer, in the codec of the call.

A raw (codec "none") payload is the tensor's own memory; an int8 one is a fresh encoding, with error
feedback on gradient slices (the residual of each (unit, destination) carried to its next send).
"""

from __future__ import annotations

import torch

from communication.compression import ErrorFeedback
from communication.group import PeerGroup
from communication.tensor_stream import Key, make_header
from protos import zerowire_pb2 as pb


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """`t` flattened, without a copy when it is contiguous."""
    flat = t.detach().reshape(-1)
    return flat if flat.is_contiguous() else flat.contiguous()


def gradient_sends(
    group: PeerGroup,
    step: int,
    unit: int,
    flat: torch.Tensor,
    codec: int,
    block: int,
    feedback: ErrorFeedback,
) -> dict[int, tuple[pb.TensorHeader, torch.Tensor]]:
    """Header and payload of slice `dest` of `flat` (fp32, world_size equal slices) for every peer."""
    n = flat.numel() // group.world_size
    sends: dict[int, tuple[pb.TensorHeader, torch.Tensor]] = {}
    for dest in group.peers():
        if dest == group.rank:
            continue
        piece = flat[dest * n : (dest + 1) * n]
        payload = piece.view(torch.uint8) if codec == pb.CODEC_NONE else feedback.encode(unit, dest, piece)
        header = make_header(
            Key(group.job_id, group.epoch, step, unit, dest),
            group.rank,
            torch.float32,
            n,
            codec,
            block,
            payload,
            with_checksum=False,  # computed by the push, off this thread, all peers in parallel
        )
        sends[dest] = (header, payload)
    return sends
