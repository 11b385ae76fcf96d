"""When the trainers ask the partitioner actors for a partition, and the step at which they all adopt it.

The policy, decided here and nowhere else:
- the first partition is requested at ``modularity.partition_at_step`` and awaited: before it there is no
  partition to train with (the method's "compute once, at the start", and xcm's default);
- with ``modularity.partition_every > 0`` a new one is requested that many steps after the last request, never
  while one is in flight; training goes on with the current partition while the actors work;
- while a request is in flight, rank 0 looks at the actors' answers at each step boundary without blocking and
  broadcasts what it saw (one integer, asynchronously); every rank reads it at the next boundary, so all adopt
  the same version at the same step, one step after rank 0 saw it, and no step waits for the broadcast;
- with ``partitioner.adopt_after_steps = N > 0`` the version requested at step s is adopted at step s + N
  instead, rank 0 waiting for the answers there if they are not in: the adoption steps no longer depend on how
  fast the actors are, so a resumed run repeats them;
- each adoption (version, request step, adoption step) is recorded; ``state_dict`` holds the record with the
  current labels, so a run resumed from a checkpoint trains on exactly the partition it had, and, with N > 0,
  the version awaiting its adoption step, so that the resumed run adopts it at that step too.
A request the actors fail for good is dropped (the current partition stays); failing the first one stops the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from orchestrator.gather import Gathered, Needs
from orchestrator.modularity import (
    ClusterabilityRegulariser,
    GroupPartition,
    MatrixGroup,
    baseline,
    regularise_groups,
)
from orchestrator.partitioning.actor import PartitionerPool, PartitionRequest, PartitionShare
from orchestrator.partitioning.report import PartitionReport
from orchestrator.ranks import Rank
from orchestrator.spec import ModularitySpec, PartitionerSpec
from orchestrator.tracking import MetricLogger

logger = logging.getLogger(__name__)

PENDING, READY, FAILED = 0, 1, 2  # what rank 0 saw of the request in flight, as broadcast to every rank


class _Decision:
    """Rank 0's observation on its way to every rank: sent at one step boundary, read at the next."""

    def __init__(self, code: int, device: torch.device):
        self._tensor = torch.tensor([code], dtype=torch.int64, device=device)  # [1], on the device nccl needs
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        self._work = dist.broadcast(self._tensor, src=0, async_op=True) if distributed else None

    def value(self) -> int:
        if self._work is not None:
            self._work.wait()
        return int(self._tensor.item())


@dataclass
class _Request:
    step: int
    adopt_at: int | None  # the step every rank adopts it at, waiting for it there; None = once rank 0 sees it
    sent: PartitionRequest | None = None  # rank 0: the actors' answers to come; None on other ranks
    shares: list[PartitionShare] = field(default_factory=list)  # the answers: rank 0's once seen, all restored
    error: Exception | None = None  # rank 0: why the actors failed, if they did
    decision: _Decision | None = None  # the observation broadcast at the last step boundary


class PartitionSchedule:
    """Owns the current partition of every rank: requests, adoption, the regulariser's labels and baselines."""

    def __init__(
        self,
        groups: Sequence[MatrixGroup],
        regulariser: ClusterabilityRegulariser,
        modularity: ModularitySpec,
        partitioner: PartitionerSpec,
        rank: Rank,
        device: torch.device,
        actor_names: Sequence[str],
        metric_logger: MetricLogger | None,
    ):
        self._groups, self._regulariser = list(groups), regulariser
        self._modularity, self._partitioner = modularity, partitioner
        self._rank, self._device = rank, device
        self.partitions: dict[str, GroupPartition] | None = None
        self.baselines: dict[str, float] = {}  # matrix name -> C of a structureless matrix under its partition
        self.version = 0
        self.adoptions: list[dict[str, int]] = []
        self._last_request: int | None = None
        self._request: _Request | None = None
        self._pool = PartitionerPool(list(actor_names), [g.name for g in groups]) if rank.leads else None
        self._report = PartitionReport(metric_logger, groups) if metric_logger is not None else None

    def due(self, step: int) -> bool:
        """A request goes out at ``partition_at_step``, then every ``partition_every`` steps after the last
        one, never while one is in flight."""
        if self._request is not None:
            return False
        if self.partitions is None:
            return step >= self._modularity.partition_at_step
        every = self._modularity.partition_every
        return every > 0 and step >= self._last_request + every

    @staticmethod
    def needs() -> Needs:
        return Needs(groups=True)

    def submit(self, step: int, gathered: Gathered | None) -> None:
        """Send the matrices gathered at `step` to the actors (rank 0), without waiting; the first partition
        is awaited and adopted here, since there is nothing to train with before it."""
        self._send(step, gathered)
        if self._request.adopt_at == step:
            self._poll(step)

    def collect(self, step: int) -> None:
        """Adopt a published version at this step boundary, when the policy above says so (every rank: it may
        enter collectives)."""
        if self._request is not None:
            self._poll(step)

    def finish(self, gathered: Gathered | None) -> None:
        """After the last step: heatmaps of the trained matrices (`gathered` on rank 0) under the current
        partition. A version still in flight is dropped, after its last broadcast has arrived."""
        if self._request is not None and self._request.decision is not None:
            self._request.decision.value()
        if self.partitions is not None and self._report is not None:
            self._report.final(gathered.groups, self.partitions)

    def state_dict(self) -> dict | None:
        """What a checkpoint keeps, as plain ints and lists: the current version, its labels, every adoption,
        and the version awaiting its adoption step; None before the first partition. Rank 0's is the one kept:
        only it has the actors' answers."""
        if self.partitions is None:
            return None
        partitions = {name: partition.to_dict() for name, partition in self.partitions.items()}
        return {
            "version": self.version,
            "last_request": self._last_request,
            "partitions": partitions,
            "adoptions": [dict(adoption) for adoption in self.adoptions],
            "pending": self._pending_state(),
        }

    def load_state_dict(self, state: dict | None) -> None:
        """Continue from `state_dict()`'s output: the same labels in the regulariser, the same record."""
        if state is None:
            return
        self.version = int(state["version"])
        self._last_request = state["last_request"]
        self.adoptions = [dict(adoption) for adoption in state["adoptions"]]
        pending = state.get("pending")  # absent from checkpoints written before adopt_after_steps
        self._request = (
            None
            if pending is None
            else _Request(
                pending["requested_at"],
                pending["adopt_at"],
                shares=[PartitionShare(**share) for share in pending["shares"]],
            )
        )
        if state["partitions"] is not None:
            self._apply({name: GroupPartition.from_dict(data) for name, data in state["partitions"].items()})

    def _send(self, step: int, gathered: Gathered | None) -> None:
        """Record the request (every rank) and, on rank 0, send the gathered matrices to the actors."""
        lag = self._partitioner.adopt_after_steps
        adopt_at = step if self.partitions is None else step + lag if lag > 0 else None
        self._request, self._last_request = _Request(step, adopt_at), step
        if self._pool is not None:
            previous = (
                None
                if self.partitions is None
                else {name: partition.to_dict() for name, partition in self.partitions.items()}
            )
            draw = self.version % self._partitioner.heatmap_every == 0  # versions 1, 1 + N, 1 + 2N...
            self._request.sent = self._pool.request(gathered.groups, previous, draw)

    def _poll(self, step: int) -> None:
        """Every rank acts on what rank 0 saw of the answers: at its adoption step, after rank 0 waited for
        them; without one, at the last step boundary (never waiting)."""
        request, waited_s = self._request, 0.0
        if request.adopt_at is None:
            code = self._code_seen_before(request)
        elif step >= request.adopt_at:
            started = time.perf_counter()
            code = self._broadcast_code(self._observe(request, wait=True))
            waited_s = time.perf_counter() - started
        else:
            return
        if code == PENDING:
            return
        self._request = None
        if code == FAILED:
            if self.partitions is None:
                raise RuntimeError(
                    "the partitioner could not compute the first partition"
                    + ("" if request.error is None else f": {request.error}")
                    + ("" if self._rank.leads else " (rank 0 has the cause)")
                ) from request.error
            logger.warning(
                "partition requested at step %d failed (%s); keeping version %d",
                request.step,
                request.error,
                self.version,
            )
            return
        shares = request.shares
        payload = [{name: data for share in shares for name, data in share.partitions.items()}]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(payload, src=0, device=self._device)
        partitions = {group.name: GroupPartition.from_dict(payload[0][group.name]) for group in self._groups}
        self._apply(partitions)
        self.version += 1
        self.adoptions.append({"version": self.version, "requested_at": request.step, "adopted_at": step})
        if self._report is not None:
            self._report.adopted(self.version, step, request.step, partitions, shares, request.sent, waited_s)

    def _code_seen_before(self, request: _Request) -> int:
        """What rank 0 saw at the last step boundary, on every rank; while that was PENDING, rank 0 sends what
        it sees now, for the next boundary."""
        code = request.decision.value() if request.decision is not None else PENDING
        if code == PENDING:
            request.decision = _Decision(self._observe(request, wait=False), self._device)
        return code

    def _pending_state(self) -> dict | None:
        """A request with an adoption step, its answers awaited: its weights were gathered at the request step,
        so a resumed run could not ask again. None without one, off rank 0, or when the actors failed (this run
        then keeps its version at the adoption step, and so does a resumed one)."""
        request = self._request
        if request is None or request.adopt_at is None or self._observe(request, wait=True) != READY:
            return None
        return {
            "requested_at": request.step,
            "adopt_at": request.adopt_at,
            "shares": [asdict(share) for share in request.shares],
        }

    def _observe(self, request: _Request, wait: bool) -> int:
        """Rank 0: whether the actors have answered (collecting the answers), waiting for them with `wait`.
        Answers in hand (awaited for a checkpoint, or restored from one) need no actor, on any rank."""
        if request.shares:
            return READY
        if self._pool is None or not (wait or self._pool.ready(request.sent)):
            return PENDING
        try:
            request.shares = self._pool.collect(request.sent)
        except Exception as error:  # an actor failed for good (Ray already restarted it and retried)
            request.error = error
            return FAILED
        return READY

    def _apply(self, partitions: dict[str, GroupPartition]) -> None:
        """Give the regulariser the new labels and recompute each matrix's baseline under them."""
        regularise_groups(self._regulariser, self._groups, partitions)
        self.partitions = partitions
        self.baselines = {
            matrix.name: float(baseline(rows, cols, partitions[group.name].k))
            for group in self._groups
            for matrix, (rows, cols) in zip(group.matrices, partitions[group.name].matrix_labels(), strict=True)
        }

    def _broadcast_code(self, code: int) -> int:
        """Rank 0's `code` on every rank: one small tensor on the training device (nccl needs it on the GPU)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return code
        tensor = torch.tensor([code], dtype=torch.int64, device=self._device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())
