"""`[lora] offload_base_blocks`: the frozen base's blocks live in host memory and are streamed
to the accelerator one at a time, so the GPU holds the small parts of the model, the adapters,
and about two blocks of the base (the running one and the prefetched next one).

How: every frozen tensor of a block (weights, biases, quantized weights with all their parts)
stays in host memory (pinned on CUDA, so copies are asynchronous). A forward pre-hook on block
i makes sure its tensors are on the accelerator (waiting for the prefetch that block i-1
started, or copying now) and starts copying the block that will run next on a side stream; a
forward post-hook points block i back at its host tensors. Its accelerator copies live only as
long as autograd needs them, which is why this needs gradient checkpointing: the backward pass
then recomputes one block at a time (running the hooks again, in reverse order, with the
prefetch following that order) instead of keeping every block's weights for its backward.
LoRA adapters train, so they never move: their optimiser and gradients stay on the accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.blocks import repeated_blocks
from .precision import _tensor_parts


@dataclass
class _Slot:
    """One block: its frozen tensors in host memory, and their accelerator copies while live."""

    host: dict[tuple[nn.Module, str], torch.Tensor]
    live: dict[tuple[nn.Module, str], torch.Tensor] | None = None
    ready: object = None  # a CUDA event recorded after the prefetch copy
    stats: dict = field(default_factory=dict)


class BlockStreamer:
    """Streams the frozen tensors of `blocks` between host memory and `device` (see module doc).
    `resident_peak` counts the most blocks whose copies were on the device at once."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str):
        self.device = torch.device(device)
        self.blocks = list(blocks)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots = [self._park(block) for block in self.blocks]
        self.previous: int | None = None
        self.resident_peak = 0
        self.copies = 0
        self.handles = []
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(
                lambda module, args, i=index: self._before(i)))
            self.handles.append(block.register_forward_hook(
                lambda module, args, out, i=index: self._after(i)))

    def _park(self, block: nn.Module) -> _Slot:
        """Move the block's frozen tensors to host memory and remember where they belong."""
        host = {}
        for module in block.modules():
            for name, param in list(module._parameters.items()):
                if param is None or param.requires_grad:
                    continue  # adapters train: they stay on the accelerator
                host[(module, name)] = self._to_host(param)
                module._parameters[name] = host[(module, name)]
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    host[(module, name)] = self._to_host(buffer)
                    module._buffers[name] = host[(module, name)]
        return _Slot(host)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        moved = _keep_kind(tensor, tensor.to("cpu"))
        if self.cuda and type(moved) in (torch.Tensor, nn.Parameter):
            # pinned: its copies run asynchronously on the side stream. Quantized tensors
            # (bitsandbytes/torchao types) are copied from pageable memory: still on the side
            # stream, but the host waits for each copy
            moved = _keep_kind(tensor, moved.detach().pin_memory())
        return moved

    def _copy(self, slot: _Slot) -> dict:
        return {key: _keep_kind(t, t.to(self.device, non_blocking=True))
                for key, t in slot.host.items()}

    def _prefetch(self, index: int) -> None:
        slot = self.slots[index]
        if slot.live is not None:
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                slot.live = self._copy(slot)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.stream)
        else:
            slot.live = self._copy(slot)
        self.copies += 1

    def _before(self, index: int) -> None:
        slot = self.slots[index]
        self._prefetch(index)  # nothing to do when the previous block prefetched it
        if slot.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(slot.ready)
            for tensor in slot.live.values():  # the compute stream uses memory the side
                for part in _tensor_parts(tensor):  # stream allocated: tell the allocator
                    part.record_stream(compute)
            slot.ready = None
        for (module, name), tensor in slot.live.items():
            (module._parameters if name in module._parameters else module._buffers)[name] = tensor
        step = 1 if self.previous is None or index >= self.previous else -1
        self.previous = index
        self.resident_peak = max(self.resident_peak,
                                 sum(s.live is not None for s in self.slots))
        following = index + step  # forward: the next block; recomputation in backward: the one before
        # a recomputation in backward may stop early (torch's non-reentrant checkpoint halts
        # once it has what the backward needs), skipping the post-hook: park such leftovers
        for other, stale in enumerate(self.slots):
            if other not in (index, following) and stale.live is not None:
                self._after(other)
        if 0 <= following < len(self.slots):
            self._prefetch(following)
            self.resident_peak = max(self.resident_peak,
                                     sum(s.live is not None for s in self.slots))

    def _after(self, index: int) -> None:
        slot = self.slots[index]
        for (module, name), tensor in slot.host.items():
            (module._parameters if name in module._parameters else module._buffers)[name] = tensor
        slot.live = None  # autograd keeps what the backward still needs

    def park_all(self) -> None:
        """Point every block back at its host tensors (after a step: nothing stays resident)."""
        for index in range(len(self.slots)):
            self._after(index)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _keep_kind(original: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """A moved parameter stays a Parameter that trains as the original did (bitsandbytes and
    torchao tensors keep their own types)."""
    if moved is original:
        return moved
    if isinstance(original, nn.Parameter) and not isinstance(moved, nn.Parameter):
        return nn.Parameter(moved, requires_grad=original.requires_grad)
    return moved


def stream_base_blocks(denoiser: nn.Module, device: torch.device | str) -> BlockStreamer:
    """Install block streaming on a LoRA denoiser whose base is frozen: everything except the
    blocks' frozen tensors goes to `device` now; those stay in host memory until used."""
    streamer = BlockStreamer(repeated_blocks(denoiser), device)
    parked = {id(t) for slot in streamer.slots for t in slot.host.values()}
    for module in denoiser.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) not in parked:
                module._parameters[name] = _keep_kind(param, param.to(device))
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and id(buffer) not in parked:
                module._buffers[name] = buffer.to(device)
    denoiser._ditctl_block_streamer = streamer
    return streamer
