"""The step loop of one worker: ZeRO-3 sharded training of a job over a PeerGroup.

Step ``s`` on rank ``r`` of ``N``: take rank r's contiguous slice of the global batch of ``s``, forward it
through the sharded model, loss = SUM of per-sample cross-entropies, backward (gradients reduce-scattered
to their owners, summed in rank order in fp32), divide the owned gradient shards by the global batch size,
clip by global norm if asked, step the sharded optimizer on the owned shards. The reported loss is the
global mean (per-rank sums all-gathered, added in rank order).

Step commit (``worker.commit``): the averaged gradient shards are mirrored to the buddy (``worker.buddy``),
the update is staged, and it is applied, here and on the buddy's replica, only once the exact vote of every
member arrived; a non-finite loss or gradient anywhere skips the step on every rank. The wire's own
``commit(s - 1)`` (releasing what this rank serves) is sent once the gradients of step ``s`` are reduced,
because only then is every peer certainly done pulling what this rank serves for step ``s - 1``.

Precision: the job's ``param_dtype`` is the compute dtype of the gathered parameters and of the inputs
(no autocast); the loss is computed in fp32 from the logits, gradients are reduced in fp32 and the fp32
shards are the master weights (see ``worker.zero3.precision``). A float32 job is plain fp32 on every
device; on CUDA a reduced-precision job feeds its inputs channels_last.

Evaluation, checkpoints and the saved model first average the BatchNorm running statistics over ranks
(see ``worker.zero3.state``), so every rank reports the same evaluation.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from communication.backend import CollectiveBackend
from communication.group import PeerGroup
from jobspec import JobSpec
from worker import commit
from worker.buddy import GradExchange, Replica
from worker.data import GlobalBatchSampler, TrainData, job_dataset, rank_slice
from worker.models import build_model, units
from worker.trainer_api import EvalReport, OpenGate, StepGate, StepReport, TrainOutcome
from worker.zero3 import precision, snapshot
from worker.zero3 import state as zstate
from worker.zero3.channels import Channel
from worker.zero3.durable import write_atomic
from worker.zero3.materialize import build_sharded
from worker.zero3.optim import ShardedOptimizer, device_sq_norm
from worker.zero3.schedule import lr_at

if TYPE_CHECKING:
    from worker.forming import Formed
    from worker.state import WorkerState

logger = logging.getLogger(__name__)

EVAL_BATCH = 512
_INIT_LOCK = threading.Lock()


class Trainer:
    """Trains ``job`` as rank ``group.rank`` of ``group`` over ``backend`` (every rank runs one)."""

    def __init__(
        self,
        job: JobSpec,
        group: PeerGroup,
        backend: CollectiveBackend,
        *,
        device: torch.device,
        data_dir: Path | None = None,
        checkpoint_dir: Path | None = None,
        collective_timeout: float = 30.0,
        startup_timeout: float | None = None,  # until the first step is committed (default: collective)
        restore: bool = True,
        data: TrainData | None = None,
        gate: StepGate | None = None,
    ) -> None:
        """``restore``: resume from the newest complete checkpoint now (else see ``restore_checkpoint``);
        ``data``: the loaded dataset, when the caller has it already; ``gate``: asked at every step whether
        this rank may commit (default: always)."""
        if job.global_batch < group.world_size:
            raise ValueError(
                f"global_batch {job.global_batch} is smaller than the world size {group.world_size}"
            )
        self.job = job
        self.group = group
        self.backend = backend
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.data: TrainData = data if data is not None else job_dataset(job, data_dir)
        backend.set_group(group)
        self.param_dtype = precision.param_dtype(job.param_dtype)
        with _INIT_LOCK:  # the initialisation draws from torch's global RNG; ranks may be threads of a test
            torch.manual_seed(job.seed)
            # built on the meta device; only this rank's shards are materialized, as an eager build would
            self.engine = build_sharded(
                lambda: build_model(job.model, self.data.num_classes, self.data.in_channels),
                group,
                backend,
                units=units,
                device=device,
                timeout=collective_timeout if startup_timeout is None else startup_timeout,
                codec=job.compression,
                param_dtype=self.param_dtype,
            )
        self.optimizer = ShardedOptimizer(self.engine.shards, job)
        self.collective_timeout = collective_timeout
        self.sampler = GlobalBatchSampler(self.data.train_size, job.global_batch, job.seed)
        self.data.follow(self._slice_of, pin_memory=device.type == "cuda")  # a streamed dataset reads ahead
        self.steps_done = 0
        self.resumed_from: int | None = None
        self._buffers_synced_at: int | None = None
        self._evaluated: dict[int, EvalReport] = {}
        self._barriers: dict[int, int] = {}
        self.exchange = GradExchange(backend, group, collective_timeout)
        self.replica: Replica | None = None  # the ward's mirror (set once the formation replicated)
        self.staged: commit.Staged | None = None
        self.last_decision: commit.CommitDecision | None = None
        self.skipped = 0
        self._overflows_seen = 0  # the engine's staging overflows already reported
        self.gate: StepGate = gate if gate is not None else OpenGate()
        if checkpoint_dir is not None and restore:
            self._resume(checkpoint_dir)

    # -- public --------------------------------------------------------------------------------------------
    def run(
        self,
        *,
        on_step: Callable[[StepReport], None] | None = None,
        on_eval: Callable[[EvalReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainOutcome:
        """Train from ``steps_done`` to ``job.steps``; raises EpochChanged / PeerLost / CollectiveTimeout if
        the membership breaks (nothing of a failed step is applied on this rank)."""
        job = self.job
        last: StepReport | None = None
        times: list[float] = []
        stopped = False
        while self.steps_done < job.steps:
            if should_stop is not None and should_stop():
                stopped = True
                logger.info("%s: stopping before step %d", self.group.describe(), self.steps_done)
                break
            last = self.train_step(self.steps_done)
            times.append(last.step_time_s)
            if on_step is not None:
                on_step(last)
            done = self.steps_done
            if job.checkpoint_every and done % job.checkpoint_every == 0 and done < job.steps:
                self.checkpoint()
            if job.eval_every and done % job.eval_every == 0 and done < job.steps:
                report = self.evaluate()
                if on_eval is not None:
                    on_eval(report)
        final: EvalReport | None = None
        if not stopped:
            final = self.evaluate()
            if on_eval is not None:
                on_eval(final)
            if job.checkpoint_every:
                self.checkpoint()
            # A finished rank may close its backend after run(): make sure no peer still pulls from it.
            # (After a stop request the ranks may stop at different steps; there is nothing to agree on.)
            self._barrier()
        return TrainOutcome(
            steps_done=self.steps_done,
            final_loss=None if last is None else last.loss,
            test_accuracy=None if final is None else final.test_accuracy,
            test_loss=None if final is None else final.test_loss,
            resumed_from=self.resumed_from,
            stopped_early=stopped,
            step_times_s=times,
        )

    def train_step(self, step: int) -> StepReport:
        if step != self.steps_done:
            raise ValueError(f"next step is {self.steps_done}, not {step}")
        job, group, engine = self.job, self.group, self.engine
        t0 = time.perf_counter()
        x, y = self._micro_batch(step)
        data_wait = self.data.take_wait()
        engine.begin(step)
        self._buffers_synced_at = None
        out = engine(x)
        loss = F.cross_entropy(out.float(), y, reduction="sum")  # the loss is fp32 whatever param_dtype
        loss.backward()
        engine.finish_backward()
        if step > 0:
            # Every peer has now contributed its gradients of `step`, so it is done with everything of
            # `step - 1` (including pulling our small all-gathers of it): release what we serve for it.
            self.backend.release(group, step - 1)
        grads = [g.div_(job.global_batch) for g in engine.grad_shards]
        self.exchange.timeout = engine.timeout  # the start-up timeout until the first step is done
        ward_grads = self.exchange.exchange(grads, step) if self.replica is not None else None
        self.staged = commit.Staged(step, grads, ward_grads)
        self.gate.staged(step)
        vote = commit.vote_values(loss, device_sq_norm(grads), engine.finite())
        self.gate.may_commit()  # a fenced rank does not vote
        votes = zstate.exchange_floats(engine, step, Channel.VOTE, vote)
        self.gate.may_commit()  # nor applies a step whose votes reached it after its lease ran out
        decision = commit.decide(step, votes, job.global_batch)
        lr = self.apply(decision)
        engine.timeout = self.collective_timeout  # past start-up: the steady-state timeout
        elapsed = time.perf_counter() - t0
        stats = engine.stats
        overflows = engine.staging_overflows - self._overflows_seen
        self._overflows_seen += overflows
        report = StepReport(
            step=step,
            loss=decision.loss,
            samples=job.global_batch,
            world_size=group.world_size,
            step_time_s=elapsed,
            compute_s=max(0.0, elapsed - stats.wait_s - data_wait),
            comm_s=stats.comm_s,
            wait_s=stats.wait_s,
            data_wait_s=data_wait,
            lr=lr,
            skipped=decision.skip,
            staging_overflows=overflows,
        )
        logger.debug(
            "%s step=%d loss=%.4f time=%.3fs wait=%.3fs",
            group.describe(),
            step,
            decision.loss,
            elapsed,
            stats.wait_s,
        )
        return report

    def apply(self, decision: commit.CommitDecision) -> float:
        """Apply the staged update of ``decision.step`` (own shards, the ward's replica); returns the lr."""
        staged = self.staged
        if staged is None or staged.step != decision.step or decision.step != self.steps_done:
            raise RuntimeError(f"no staged update of step {decision.step} (next step {self.steps_done})")
        if decision.skip:
            self.skipped += 1
            logger.warning(
                "%s: step %d skipped on every rank (non-finite values)", self.group.describe(), decision.step
            )
            lr = lr_at(self.job, decision.step)
        else:
            coef = decision.clip_coef(self.job)
            lr = self.optimizer.step(staged.grads, decision.step, coef)
            if self.replica is not None and staged.ward_grads is not None:
                self.replica.apply(staged.ward_grads, decision.step, coef)
        self.staged = None
        self.last_decision = decision
        self.steps_done = decision.step + 1
        return lr

    def form(self, state: WorkerState, ids: tuple[str, ...], job_committed: int) -> Formed:
        """Collective: form this trainer's epoch from what the worker holds (``worker.forming``)."""
        from worker.forming import form

        return form(self, state, ids, job_committed)

    def resume_at(self, step: int) -> None:
        """The formation handed over the state of ``step`` committed steps: train from there."""
        self.steps_done = step

    def mirror(self, replica: Replica | None) -> None:
        """The formation mirrored the ward's shard here (None: no ward): apply every committed update to it
        too."""
        self.replica = replica

    def restore_checkpoint(self) -> int | None:
        """Collective: resume from the newest complete checkpoint every rank sees; its step, or None."""
        if self.checkpoint_dir is not None:
            self._resume(self.checkpoint_dir)
        return self.resumed_from

    def evaluate(self) -> EvalReport:
        """Test loss and accuracy of the current model (collective; every rank returns the same report)."""
        key = self.steps_done
        if key in self._evaluated:
            return self._evaluated[key]
        engine, group = self.engine, self.group
        self._sync_buffers(key)
        start, stop = rank_slice(self.data.test_size, group.world_size, group.rank)
        longest = rank_slice(self.data.test_size, group.world_size, 0)
        chunks = max(1, -(-(longest[1] - longest[0]) // EVAL_BATCH))  # same count on every rank
        sums = torch.zeros(3, dtype=torch.float64)
        engine.model.eval()
        try:
            engine.begin(key)
            with torch.no_grad():
                for idx in torch.arange(start, stop).tensor_split(chunks):
                    batch_x, batch_y = self.data.test_batch(idx)
                    x = self._to_device(batch_x)
                    y = batch_y.to(self.device)
                    logits = engine(x).float()
                    sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
                    sums[1] += float((logits.argmax(dim=1) == y).sum())
                    sums[2] += float(y.numel())
        finally:
            engine.model.train()
        total = zstate.rank_order_sum(zstate.exchange_floats(engine, key, Channel.EVAL, sums.float()))
        count = max(1.0, float(total[2]))
        report = EvalReport(
            step=key, test_loss=float(total[0]) / count, test_accuracy=float(total[1]) / count
        )
        self._evaluated = {key: report}
        logger.info(
            "%s step=%d test_loss=%.4f test_accuracy=%.4f",
            group.describe(),
            key,
            report.test_loss,
            report.test_accuracy,
        )
        return report

    def save_model(self, path: Path) -> None:
        """Collective: every rank calls; rank 0 writes the full model (safetensors, state-dict names)."""
        from safetensors.torch import save

        key = self.steps_done
        self._sync_buffers(key)
        state = zstate.full_state_dict(self.engine, key, sync=False)
        self._barrier()
        if self.group.rank != 0:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in state.items()}
        metadata = {"model": self.job.model}
        classes = self.data.describe().get("classes")
        if classes:  # a dataset whose classes have names (imagefolder): the model's outputs, in order
            metadata["classes"] = json.dumps(classes)
        write_atomic(path, save(tensors, metadata=metadata))
        logger.info("%s: saved model after %d steps to %s", self.group.describe(), key, path)

    def checkpoint(self) -> None:
        """Collective: write this rank's part of the checkpoint of the current step to ``checkpoint_dir``."""
        if self.checkpoint_dir is None:
            return
        self._sync_buffers(self.steps_done)
        snapshot.save(self.engine, self.optimizer, self.job, self.checkpoint_dir, self.steps_done)

    # -- internals -----------------------------------------------------------------------------------------
    def _resume(self, checkpoint_dir: Path) -> None:
        step = snapshot.restore(self.engine, self.optimizer, self.job, checkpoint_dir)
        if step is not None:
            self.steps_done = step
            self.resumed_from = step
            self._buffers_synced_at = step  # the saved buffers were averaged
            logger.info("%s: resumed from the checkpoint of step %d", self.group.describe(), step)

    def _barrier(self) -> None:
        """All ranks reach this point; afterwards no peer still pulls anything from this rank."""
        key = self.steps_done
        count = self._barriers.get(key, 0)
        self._barriers = {key: count + 1}
        zstate.barrier(self.engine, key, count)

    def _sync_buffers(self, key: int) -> None:
        if self._buffers_synced_at != key:
            zstate.sync_buffers(self.engine, key)
            self._buffers_synced_at = key

    def _slice_of(self, step: int) -> tuple[torch.Tensor, int]:
        """This rank's sample indices of the global batch of ``step``, and the position of the first."""
        group = self.group
        idx = self.sampler.local_indices(step, group.world_size, group.rank)
        return idx, rank_slice(self.job.global_batch, group.world_size, group.rank)[0]

    def _micro_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, offset = self._slice_of(step)
        x, y = self.data.train_batch(idx, step, offset)
        return self._to_device(x), y.to(self.device)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs on the device in the compute dtype. channels_last only for reduced precision
        on CUDA, where its kernels are the fast ones; fp32 keeps the default layout and kernels."""
        x = precision.cast_input(x.to(self.device, non_blocking=self.device.type == "cuda"), self.param_dtype)
        if self.device.type == "cuda" and self.param_dtype != torch.float32 and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
