"""DualPipeV: the V-shaped bidirectional pipeline schedule.

The schedule follows DualPipeV from DeepSeek's DualPipe project (MIT licence), with a
V-shaped stage layout introduced by Sea AI Lab. With P pipeline ranks the model is cut
into 2P stages; pp rank r runs stage r as phase 0 and stage 2P-1-r as phase 1. Data goes
rank 0 -> P-1 in phase 0, turns around locally on rank P-1, and comes back P-1 -> 0 in
phase 1, so rank 0 holds both the embedding and the head and computes the loss.

Each step runs ``num_chunks`` micro-batches forward and backward through both phases in
eight sub-steps (counts for rank r):

1. ``2(P-r-1)`` forwards of phase 0 (warm-up);
2. ``r+1`` pairs (F0, F1);
3. ``P-r-1`` x (B1, W, F1) with zero-bubble weight gradients;
4. ``N-2P+r+1`` x (F0 with B1, then F1 with B0), each pair through
   ``overlapped_forward_backward``;
5. ``P-r-1`` x (B1, then F1 with B0);
6. ``r+1`` pairs (B1, B0), zero-bubble from the middle on;
7. ``P-r-1`` x (W, B0);
8. ``r+1`` W, after which the weight-gradient queue must be empty.

Messages are queued and committed in batches (``dist.batch_isend_irecv``) at the start of
every chunk, so a send leaves together with the next batch of receives.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from pithtrain.dualpipe import comm
from pithtrain.dualpipe.execution import IntermediateTensors, create_intermediate_tensors
from pithtrain.dualpipe.overlap import (
    backward_with_records,
    forward_with_records,
    overlapped_forward_backward,
)
from pithtrain.dualpipe.utils import WeightGradStore, gather, scatter


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class DualPipeV(nn.Module):
    """Run the two stage modules of this pp rank under the DualPipeV schedule."""

    def __init__(
        self,
        modules: Tuple[nn.Module, nn.Module],
        pp_group: dist.ProcessGroup,
        ep_group: dist.ProcessGroup,
    ) -> None:
        super().__init__()
        assert len(modules) == 2, "DualPipeV takes (phase-0 module, phase-1 module)"
        self.module = nn.ModuleList(modules)
        self.device = _module_device(self.module[0])
        assert _module_device(self.module[1]) == self.device
        self.batch_dim = 0
        self.pp_group = pp_group
        self.ep_group = ep_group
        self.pp_size = pp_group.size()
        self.pp_rank = pp_group.rank()
        self.ep_size = ep_group.size()
        self.ep_rank = ep_group.rank()
        self.prev_pp_rank = self.pp_rank - 1 if self.pp_rank > 0 else None
        self.next_pp_rank = self.pp_rank + 1 if self.pp_rank < self.pp_size - 1 else None
        self.is_first_pp_rank = self.pp_rank == 0
        self.is_last_pp_rank = self.pp_rank == self.pp_size - 1
        # Called with a short description whenever this rank starts something new, so
        # that a hang can be located; None to stay silent. Compute steps read "F0 chunk 3",
        # "B1 chunk 2" (+ " (zero-bubble)"), "F1 chunk 4 + B0 chunk 1" (overlapped) or
        # "W (deferred weight gradients)"; waits start with "P2P wait:".
        self.on_progress: Optional[Callable[[str], None]] = None
        self._records: Tuple[List[IntermediateTensors], List[IntermediateTensors]] = ([], [])

    # ------------------------------------------------------------------ bookkeeping

    def _progress(self, what: str) -> None:
        if self.on_progress is not None:
            self.on_progress(what)

    def _ensure_records(self, num_chunks: int) -> None:
        """Preallocate one record set per (phase, micro-batch); reuse them across steps."""
        if len(self._records[0]) == num_chunks:
            return
        self._records = tuple(
            [
                create_intermediate_tensors(
                    len(m.layers), m.embed_tokens is not None, m.norm is not None
                )
                for _ in range(num_chunks)
            ]
            for m in self.module
        )

    def _reset_states(self) -> None:
        WeightGradStore.clear()
        self.input_chunks: Tuple[list, list] = ([], [])
        self.output_chunks: Tuple[list, list] = ([], [])
        self.input_grad_chunks: Tuple[list, list] = ([], [])
        self.output_grad_chunks: Tuple[list, list] = ([], [])
        self.labels: List[tuple] = []
        self.loss_chunks: List[torch.Tensor] = []
        self.criterion: Optional[Callable] = None
        self.current_f_chunk_id = [0, 0]
        self.current_b_chunk_id = [0, 0]
        self.current_send_f_chunk_id = [0, 0]
        self.current_send_b_chunk_id = [0, 0]
        self.current_recv_f_chunk_id = [0, 0]
        self.current_recv_b_chunk_id = [0, 0]
        self.comm_ops: List[dist.P2POp] = []
        self.comm_desc: List[str] = []

    def _is_loss_stage(self, phase: int) -> bool:
        return self.is_first_pp_rank and phase == 1

    # ------------------------------------------------------------------ compute

    def _after_forward(self, phase: int, outputs: List[torch.Tensor]) -> None:
        if self.is_last_pp_rank and phase == 0:
            # Local turnaround: phase 0's output is phase 1's input on the same rank.
            self.input_chunks[1].append([o.detach().requires_grad_() for o in outputs])
        if not self._is_loss_stage(phase) or self.return_outputs:
            self.output_chunks[phase].append(outputs)

    def _after_backward(self, phase: int, chunk_id: int, input_grads) -> None:
        self.input_chunks[phase][chunk_id] = None
        if self.is_last_pp_rank and phase == 1:
            self.output_grad_chunks[0].append(input_grads)
        else:
            self.input_grad_chunks[phase].append(input_grads)

    def _backward_inputs(self, phase: int, chunk_id: int):
        """``(loss, outputs, output_grads)`` to start a chunk's backward from.

        The loss stage starts from its loss (the other two are None); every other stage
        from the gradients it received for its outputs (outputs without one are dropped).
        """
        if self._is_loss_stage(phase):
            return self.loss_chunks[chunk_id], None, None
        outputs = self.output_chunks[phase][chunk_id]
        if not self.return_outputs:
            self.output_chunks[phase][chunk_id] = None
        grads = self.output_grad_chunks[phase][chunk_id]
        self.output_grad_chunks[phase][chunk_id] = None
        pairs = [(t, g) for t, g in zip(outputs, grads) if g is not None]
        return None, [t for t, _ in pairs], [g for _, g in pairs]

    def _forward_compute_chunk(self, phase: int) -> None:
        chunk_id = self.current_f_chunk_id[phase]
        self.current_f_chunk_id[phase] += 1
        self._progress(f"F{phase} chunk {chunk_id}")
        inputs = self.input_chunks[phase][chunk_id]
        if self.forward_only:
            self.input_chunks[phase][chunk_id] = None
        outputs = forward_with_records(self.module[phase], inputs, self._records[phase][chunk_id])
        if self._is_loss_stage(phase) and self.criterion is not None:
            self.loss_chunks.append(self.criterion(*outputs, *self.labels[chunk_id]))
        self._after_forward(phase, outputs)

    def _backward_compute_chunk(self, phase: int, enable_zb: bool = False) -> None:
        if self.forward_only:
            return
        chunk_id = self.current_b_chunk_id[phase]
        self.current_b_chunk_id[phase] += 1
        self._progress(f"B{phase} chunk {chunk_id}" + (" (zero-bubble)" if enable_zb else ""))
        loss, _, dy = self._backward_inputs(phase, chunk_id)
        WeightGradStore.enabled = enable_zb
        input_grads = backward_with_records(
            self.module[phase], dy, loss, self._records[phase][chunk_id]
        )
        WeightGradStore.enabled = False
        if loss is not None:
            loss.detach_()
        if enable_zb:
            WeightGradStore.flush()
        self._after_backward(phase, chunk_id, input_grads)

    def _forward_backward_compute_chunk(self, phase0: int, phase1: int) -> None:
        if self.forward_only:
            self._forward_compute_chunk(phase0)
            return
        chunk_id0 = self.current_f_chunk_id[phase0]
        self.current_f_chunk_id[phase0] += 1
        chunk_id1 = self.current_b_chunk_id[phase1]
        self.current_b_chunk_id[phase1] += 1
        self._progress(f"F{phase0} chunk {chunk_id0} + B{phase1} chunk {chunk_id1}")
        with_loss = self._is_loss_stage(phase0) and self.criterion is not None
        loss1, outputs1, dy1 = self._backward_inputs(phase1, chunk_id1)
        outputs0, loss0, input_grads1 = overlapped_forward_backward(
            self.module[phase0],
            self.input_chunks[phase0][chunk_id0],
            self.criterion if with_loss else None,
            self.labels[chunk_id0] if with_loss else (),
            self._records[phase0][chunk_id0],
            self.module[phase1],
            loss1,
            outputs1,
            dy1,
            self._records[phase1][chunk_id1],
            None,
            self.ep_group,
        )
        if with_loss:
            self.loss_chunks.append(loss0)
        self._after_forward(phase0, outputs0)
        self._after_backward(phase1, chunk_id1, input_grads1)

    def _weight_chunk(self) -> None:
        if self.forward_only:
            return
        self._commit_and_wait_comm()
        self._progress("W (deferred weight gradients)")
        WeightGradStore.pop()

    # ------------------------------------------------------------------ P2P

    def _recv_forward(self, phase: int) -> None:
        if (self.is_first_pp_rank and phase == 0) or (self.is_last_pp_rank and phase == 1):
            return
        chunk_id = self.current_recv_f_chunk_id[phase]
        self.current_recv_f_chunk_id[phase] += 1
        src = self.prev_pp_rank if phase == 0 else self.next_pp_rank
        tag = comm.message_tag(chunk_id, phase, comm.FORWARD)
        self.input_chunks[phase].append(
            comm.append_irecv(self.comm_ops, src, self.pp_group, self.device, tag)
        )
        self.comm_desc.append(f"recv F{phase} chunk {chunk_id} from pp{src}")

    def _send_forward(self, phase: int) -> None:
        if (self.is_first_pp_rank and phase == 1) or (self.is_last_pp_rank and phase == 0):
            return
        chunk_id = self.current_send_f_chunk_id[phase]
        self.current_send_f_chunk_id[phase] += 1
        dst = self.next_pp_rank if phase == 0 else self.prev_pp_rank
        tag = comm.message_tag(chunk_id, phase, comm.FORWARD)
        outputs = self.output_chunks[phase][chunk_id]
        comm.append_isend(self.comm_ops, outputs, dst, self.pp_group, tag)
        self.comm_desc.append(f"send F{phase} chunk {chunk_id} to pp{dst}")

    def _recv_backward(self, phase: int) -> None:
        if self.forward_only:
            return
        if (self.is_first_pp_rank and phase == 1) or (self.is_last_pp_rank and phase == 0):
            return
        chunk_id = self.current_recv_b_chunk_id[phase]
        self.current_recv_b_chunk_id[phase] += 1
        src = self.next_pp_rank if phase == 0 else self.prev_pp_rank
        tag = comm.message_tag(chunk_id, phase, comm.BACKWARD)
        self.output_grad_chunks[phase].append(
            comm.append_irecv(self.comm_ops, src, self.pp_group, self.device, tag)
        )
        self.comm_desc.append(f"recv B{phase} chunk {chunk_id} from pp{src}")

    def _send_backward(self, phase: int) -> None:
        if self.forward_only:
            return
        if (self.is_first_pp_rank and phase == 0) or (self.is_last_pp_rank and phase == 1):
            return
        chunk_id = self.current_send_b_chunk_id[phase]
        self.current_send_b_chunk_id[phase] += 1
        dst = self.prev_pp_rank if phase == 0 else self.next_pp_rank
        tag = comm.message_tag(chunk_id, phase, comm.BACKWARD)
        grads = self.input_grad_chunks[phase][chunk_id]
        self.input_grad_chunks[phase][chunk_id] = None
        comm.append_isend(self.comm_ops, grads, dst, self.pp_group, tag)
        self.comm_desc.append(f"send B{phase} chunk {chunk_id} to pp{dst}")

    def _commit_and_wait_comm(self) -> None:
        if not self.comm_ops:
            return
        self._progress("P2P wait: " + ", ".join(self.comm_desc))
        for work in dist.batch_isend_irecv(self.comm_ops):
            work.wait()
        self.comm_ops = []
        self.comm_desc = []

    # ------------------------------------------------------------------ chunks with comm

    def _forward_chunk(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self._recv_forward(phase)
        self._commit_and_wait_comm()
        self._forward_compute_chunk(phase)
        if send:
            self._send_forward(phase)

    def _backward_chunk(
        self, phase: int, enable_zb: bool = False, recv: bool = True, send: bool = True
    ) -> None:
        if recv:
            self._recv_backward(phase)
        self._commit_and_wait_comm()
        self._backward_compute_chunk(phase, enable_zb)
        if send:
            self._send_backward(phase)

    def _forward_backward_chunk(self, phase0: int, phase1: int, recv0: bool = True) -> None:
        if recv0:
            self._recv_forward(phase0)
        self._recv_backward(phase1)
        self._commit_and_wait_comm()
        self._forward_backward_compute_chunk(phase0, phase1)
        self._send_forward(phase0)
        self._send_backward(phase1)

    # ------------------------------------------------------------------ FSDP

    def _suspend_fsdp_sync(self) -> None:
        """Keep FSDP from reducing or resharding after each of the many partial backwards."""
        for module in self.module:
            if not isinstance(module, FSDPModule):
                continue
            module.set_is_last_backward(False)
            module.set_reshard_after_backward(False)
            module.set_requires_gradient_sync(False)
            # run_backward would queue the root's end-of-backward callback each time;
            # mark it queued and call it once after the loop instead.
            fully_shard.state(module)._state_ctx.post_backward_final_callback_queued = True

    def _finish_fsdp_backward(self) -> None:
        """Reduce the accumulated gradients and finalise FSDP, as one ``.backward()`` would."""
        for module in self.module:
            if not isinstance(module, FSDPModule):
                continue
            module.set_is_last_backward(True)
            module.set_reshard_after_backward(True)
            module.set_requires_gradient_sync(True)
            state = fully_shard.state(module)
            for sub_state in state._state_ctx.all_states:
                if sub_state._fsdp_param_group is not None:
                    sub_state._fsdp_param_group.post_backward()
            state._root_post_backward_final_callback()

    # ------------------------------------------------------------------ the step

    def step(
        self,
        *inputs: Optional[torch.Tensor],
        num_chunks: int = 0,
        criterion: Optional[Callable] = None,
        labels: Sequence[Optional[torch.Tensor]] = (),
        return_outputs: bool = False,
    ) -> Tuple[Optional[torch.Tensor], Optional[object]]:
        """Run ``num_chunks`` micro-batches forward (and backward, unless grad is disabled).

        ``inputs``, ``criterion`` and ``labels`` matter on the first pp rank only, where
        ``criterion(*outputs, *labels)`` gives each micro-batch's loss. Returns
        ``(loss, outputs)``: on the first pp rank ``loss`` stacks the per-micro-batch
        losses and ``outputs`` are the gathered outputs when requested; elsewhere
        ``(None, None)``.
        """
        assert comm.TENSOR_SHAPES is not None and comm.TENSOR_DTYPE is not None, (
            "call set_p2p_tensor_shapes and set_p2p_tensor_dtype before DualPipeV.step"
        )
        self.forward_only = not torch.is_grad_enabled()
        self.return_outputs = return_outputs
        P, r, N = self.pp_size, self.pp_rank, num_chunks
        assert N > 0 and N >= 2 * P, f"DualPipeV needs num_chunks >= 2 * pp_size ({N=}, {P=})"
        if self.is_first_pp_rank and not self.forward_only:
            assert criterion is not None, "the first pp rank computes the loss: pass a criterion"

        if not self.forward_only:
            self._suspend_fsdp_sync()
        self._reset_states()
        self._ensure_records(N)
        if self.is_first_pp_rank:
            self.input_chunks = (scatter(inputs, N, self.batch_dim), [])
            self.labels = scatter(labels, N, self.batch_dim)
            self.criterion = criterion

        # 1. Warm-up: fill the pipe of phase 0.
        for _ in range(2 * (P - r - 1)):
            self._forward_chunk(0)

        # 2. Alternate the phases; the last rank holds back its final F1 send until step 4.
        self._recv_forward(0)
        for i in range(r + 1):
            self._forward_chunk(0, recv=False, send=False)
            self._recv_forward(0)
            self._forward_chunk(1, send=not self.is_last_pp_rank or i < r)
            self._send_forward(0)

        # 3. First phase-1 backwards, their weight gradients right away.
        for _ in range(P - r - 1):
            self._backward_chunk(1, enable_zb=True)
            self._recv_forward(1)
            self._weight_chunk()
            self._forward_chunk(1, recv=False)

        # 4. Steady state: every forward paired with a backward of the other phase.
        for i in range(N - 2 * P + r + 1):
            if i == 0 and self.is_last_pp_rank:
                # Run F0 and B1 one after the other and reorder the sends: the
                # turnaround makes each the other's neighbour on this rank.
                self._forward_chunk(0, recv=False, send=False)
                self._send_forward(1)
                self._backward_chunk(1, send=False)
                self._send_forward(0)
                self._send_backward(1)
            else:
                self._forward_backward_chunk(0, 1, recv0=i > 0)
            self._forward_backward_chunk(1, 0)

        # 5. Drain phase-1 forwards.
        for _ in range(P - r - 1):
            self._backward_chunk(1)
            self._forward_backward_chunk(1, 0)

        # 6. Remaining backwards; defer weight gradients from the middle on.
        enable_zb = False
        for i in range(r + 1):
            if i == (r + 1) // 2 and r % 2 == 1:
                enable_zb = True
            self._backward_chunk(1, enable_zb=enable_zb)
            if i == (r + 1) // 2 and r % 2 == 0:
                enable_zb = True
            self._backward_chunk(0, enable_zb=enable_zb)

        # 7. and 8. Deferred weight gradients.
        for _ in range(P - r - 1):
            self._weight_chunk()
            self._backward_chunk(0, enable_zb=True)
        for _ in range(r + 1):
            self._weight_chunk()
        assert not WeightGradStore.funcs_queue, "weight-gradient queue not drained"
        self._commit_and_wait_comm()

        loss, outputs = None, None
        if self.is_first_pp_rank:
            if criterion is not None:
                loss = torch.stack(self.loss_chunks)
            if return_outputs:
                outputs = gather(self.output_chunks[1], self.batch_dim)
                outputs = outputs[0] if len(outputs) == 1 else outputs
        self._reset_states()
        if not self.forward_only:
            self._finish_fsdp_backward()
        self._progress("step done")
        return loss, outputs
