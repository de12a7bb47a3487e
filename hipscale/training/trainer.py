"""The training loop: DeepSpeed engine, checkpoints, NaN guard, preemption, logging, evaluation.

Every decision that changes control flow (skip a step, stop for bad data or NaNs, stop for
preemption, interrupt an eval) is taken from all-reduced values, so all ranks take it at the
same step and no rank is left waiting in a collective.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from hipscale.config import JobConfig, config_to_dict, config_to_yaml
from hipscale.data.errors import DatasetChangedError
from hipscale.data.loading.dataset_change import describe_change
from hipscale.model.flops import training_flops_per_sample
from hipscale.seeding import seeded_generator
from hipscale.training.activation_checkpoint import apply_activation_checkpointing
from hipscale.training.batches import EpochStream, labels_of, model_inputs
from hipscale.training.compile import compile_blocks
from hipscale.training.components import checkpoint as ckpt
from hipscale.training.components.disk import writing
from hipscale.training.components.logger import MetricLogger, memory_gib
from hipscale.training.components.metrics import peak_tflops, throughput
from hipscale.training.components.outcome import (EvaluationError, NonFiniteError, SetupError, TooManyBadSamples,
                                                  is_own_failure)
from hipscale.training.components.pictures import position_embedding_pictures, reconstruction_pictures
from hipscale.training.components.preemption import PreemptionFlag
from hipscale.training.components.universal import convert_to_universal
from hipscale.training.data_setup import build_loader, has_eval
from hipscale.training.distributed import all_reduce_max, all_reduce_sum
from hipscale.training.ds_config import build_deepspeed_config
from hipscale.training.elastic import WORLD_SIZES_VARIABLE, StartRecords, describe_restart, launcher_world_sizes
from hipscale.training.evaluate import eval_batch_count, evaluate, undefined_metrics
from hipscale.training.export import export_weights
from hipscale.training.global_batch import accumulation_for, check_world_sizes, resolve_global_batch
from hipscale.training.init_from import init_from
from hipscale.training.model_setup import build_augmentation, build_model, dataset_card, model_spec
from hipscale.training.objective import Objective
from hipscale.training.optim import build_optimizer
from hipscale.training.preflight import checkpoint_dir, run_dir
from hipscale.training.schedule import reapply, warmup_cosine


def use_bf16(config: JobConfig) -> bool:
    """Resolved precision: "auto" means bf16 on an accelerator, fp32 on CPU."""
    if config.precision.dtype == "auto":
        return get_accelerator().device_name() != "cpu"
    return config.precision.dtype == "bf16"


class Trainer:
    """Owns the engine, data stream and checkpoint manager of one run.

    Args:
        config: the validated job config.
        info: dataset info (modalities, num_classes, multi_label).
        resume: "none", "auto" (the checkpoint `latest` names, if any) or a tag.
        universal: resume through DeepSpeed's universal checkpoint even at the checkpoint's world size (it is
            used whenever the world size changed).
        preemption: the flag the process's signal handlers set (installed before anything slow).
        start: this start's id (`elastic.start_id()`): names the sample-key logs.
        records: under --elastic, the run's start and fault records (rank 0 prints the restart line).
        hosts: every rank's "hostname (address)" (`distributed.rank_hosts()`).
    """

    def __init__(self, config: JobConfig, info: Any, resume: str = "none", universal: bool = False,
                 preemption: Optional[PreemptionFlag] = None, start: str = "run",
                 records: Optional[StartRecords] = None, hosts: Optional[list[str]] = None):
        self.config, self.info = config, info
        self.preemption = preemption or PreemptionFlag()
        self.records, self.hosts = records, hosts or []
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(get_accelerator().current_device_name())
        self.run_dir, self.ckpt_dir = run_dir(config), checkpoint_dir(config)
        self.logger = MetricLogger(self.rank, self.run_dir / "tensorboard" if config.logging.tensorboard else None,
                                   self.run_dir / "metrics.jsonl")
        self.modalities = list(info.modalities)
        self.objective = Objective(config.objectives, info.num_classes, info.multi_label)
        self.augment = build_augmentation(config, info)
        self.spec = model_spec(config, info)
        self.dataset_card = dataset_card(config, info, self.augment)

        self.activity: Optional[str] = None  # what the rank does outside a training step, for failure reports
        self.manager = ckpt.CheckpointManager(self.ckpt_dir, config.checkpoint.keep_last, self.rank,
                                              self.world_size, config.checkpoint.checksums)
        self._check_shared_checkpoint_dir()
        resume_tag = self._resume_tag(resume)
        saved = self.manager.marker(resume_tag) if resume_tag is not None else None
        self._resolve_batch(saved)
        universal = universal or (saved is not None and saved["world_size"] != self.world_size)

        torch.manual_seed(config.run.seed)  # identical initial weights on every rank
        model = build_model(self.spec)
        self._init_from(model, resume_tag)
        self.flops_per_sample = float(training_flops_per_sample(model))
        self.inputs_per_sample = sum(m for m, _ in self.spec["inputs"].values())
        compiled = compile_blocks(model, config.compile.policy)
        chosen = apply_activation_checkpointing(model, config.activation_checkpoint)
        bf16 = use_bf16(config)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        ds_config, conflicts = build_deepspeed_config(config, bf16, load_universal=universal)
        for message in conflicts:
            self.logger.info(f"config conflict: {message}")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, config.optimizer), config=ds_config,
            lr_scheduler=lambda opt: warmup_cosine(opt, config.training.steps, config.schedule))
        self.module = self.engine.module
        self.logger.info(f"activation checkpointing ({config.activation_checkpoint.policy}): blocks {chosen}; "
                         f"torch.compile ({config.compile.policy}): blocks {compiled}")
        self._record_config(ds_config)

        self.stream = EpochStream(build_loader(config, "train", self.rank, self.world_size))
        self.has_eval = has_eval(config)
        self.step = self.last_saved_step = 0
        self.resumed_from: Optional[int] = None
        self.skipped_total, self.skipped_in_a_row = 0, 0
        self.bad_samples_total, self._bad_seen = 0, 0
        if resume_tag is not None:
            self._resume(resume_tag, universal)
        if self.records is not None and self.rank == 0:
            self.records.read_previous()
        self.key_log = None
        if config.logging.sample_keys:
            self.key_log_path = self.run_dir / "sample_keys" / f"{start}_rank{self.rank:05d}.jsonl"
            with writing(self.key_log_path, "sample keys"):
                self.key_log_path.parent.mkdir(exist_ok=True)
                self.key_log = open(self.key_log_path, "a", buffering=1)  # line by line: a killed rank keeps them

    @property
    def where(self) -> str:
        """Where this rank is, for a failure report: "in step N", "while saving the checkpoint of step N", "in the
        evaluation at step N", "in the final evaluation, after step N"..."""
        return self.activity or f"in step {self.step + 1}"

    def _resolve_batch(self, saved: Optional[dict]) -> None:
        """Fix the global batch G and this start's gradient accumulation in the config (the resolved config
        printed and saved shows both); `saved` is the COMPLETE record of the checkpoint resumed."""
        t, micro = self.config.training, self.config.data.micro_batch_size
        saved_batch = None
        if saved is not None:  # checkpoints written before the global batch rule: their own accumulation
            saved_batch = saved.get("global_batch_size", micro * t.gradient_accumulation_steps * saved["world_size"])
        t.global_batch_size = resolve_global_batch(self.config, self.world_size, saved_batch)
        if self.records is not None:  # every world size the elastic launcher may make, not just this one
            check_world_sizes(t.global_batch_size, micro, launcher_world_sizes(),
                              f" (world sizes this elastic job may have: {WORLD_SIZES_VARIABLE})")
        t.gradient_accumulation_steps = accumulation_for(t.global_batch_size, micro, self.world_size)

    def _check_shared_checkpoint_dir(self) -> None:
        missing = self.manager.check_shared()
        if missing:
            raise SetupError(f"checkpoint.dir {self.ckpt_dir} is not one folder shared by every rank: "
                             f"{', '.join(missing)} cannot read what rank 0 wrote there. Point checkpoint.dir "
                             f"(or run.output_dir) at a filesystem every node mounts; node-local disks "
                             f"cannot hold a sharded checkpoint.")

    def _record_config(self, ds_config: dict) -> None:
        """Print the resolved config and save it (and the DeepSpeed config) in the run folder."""
        text = config_to_yaml(self.config)
        self.logger.info(f"resolved config:\n{text}")
        if self.rank == 0:
            with writing(self.run_dir, "the resolved config"):
                (self.run_dir / "config.yaml").write_text(text)
                (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    def _resume_tag(self, resume: str) -> Optional[str]:
        """The checkpoint `--resume` names (None: start fresh), verified (collective). `auto` passes over damaged
        checkpoints to the newest one that verifies; a rollback to an older tag moves `latest`.

        Raises:
            CheckpointError: the tag is not a complete checkpoint.
            SetupError: the named checkpoint, or every complete one under `auto`, fails verification.
        """
        if resume == "none":
            return None
        latest = self.manager.latest()
        if resume != "auto" and not (self.ckpt_dir / resume / ckpt.COMPLETE).is_file():
            raise ckpt.CheckpointError(f"--resume {resume}: {self.ckpt_dir / resume} is not a complete checkpoint")
        candidates = [resume] if resume != "auto" else self.manager.resume_candidates(latest) if latest else []
        if not candidates:
            self.logger.info(f"--resume {resume}: no complete checkpoint in {self.ckpt_dir}; starting fresh")
            return None
        damaged = []
        for tag in candidates:
            problems = self.manager.verify(tag)
            if not problems:
                break
            damaged.append(f"{self.ckpt_dir / tag}: {problems[0]}"
                           + (f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""))
            self.logger.info(f"checkpoint {tag} is damaged, not loaded: {'; '.join(problems)}")
        else:
            listing = f"python -m hipscale.training.verify {self.ckpt_dir} lists what verifies"
            if resume == "auto":
                raise SetupError(f"--resume auto: no checkpoint verifies: {'; '.join(damaged)}; --resume none "
                                 f"starts afresh ({listing})")
            raise SetupError(f"--resume {resume}: the checkpoint is damaged: {damaged[0]}; --resume auto takes the "
                             f"newest checkpoint that verifies ({listing})")
        if damaged:
            self.logger.info(f"--resume auto: resuming from {tag}, the newest checkpoint that verifies "
                             f"(damaged: {'; '.join(damaged)})")
        if tag != latest and self.rank == 0:  # a rollback: newer checkpoints belong to an abandoned run
            ckpt.write_atomically(self.ckpt_dir / "latest", tag)
        return tag

    def _init_from(self, model: torch.nn.Module, resume_tag: Optional[str]) -> None:
        """model.init_from: copy another run's matching weights into the fresh model, unless resuming."""
        source = self.config.model.init_from
        if source is None:
            return
        if resume_tag is not None:
            self.logger.info(f"model.init_from {source} not used: resuming from {self.ckpt_dir / resume_tag}")
            return
        report = init_from(model, source)
        self.logger.info(report.summary())
        if self.rank == 0:
            report.write(self.run_dir / "init_from.json")

    def _resume(self, tag: str, universal: bool) -> None:
        if universal:
            if self.rank == 0:
                convert_to_universal(self.ckpt_dir / tag)
            dist.barrier()
        client_state, rank_state, same_world_size = self.manager.load(self.engine, tag, universal)
        reapply(self.engine.lr_scheduler)
        self.step = self.last_saved_step = self.resumed_from = client_state["step"]
        self.skipped_total = client_state["skipped_total"]
        self.bad_samples_total = client_state.get("bad_samples_total", 0)
        self._restore_data_position(tag, rank_state)
        if not same_world_size:  # RNG streams are per rank: reseed them from (seed, rank, step)
            torch.manual_seed(self.config.run.seed + 1000003 * (self.rank + 1) + self.step)
        self.logger.info(f"resumed from {self.ckpt_dir / tag} at step {self.step}"
                         f"{' (universal)' if universal else ''}")

    def _restore_data_position(self, tag: str, rank_state: dict) -> None:
        """The data stream's position of the checkpoint; on other shards than it was saved on, refuse or (with
        data.on_dataset_change=restart) start the next epoch from its beginning on the shards of now."""
        try:
            self.stream.load_state_dict(rank_state["data"])
            return
        except DatasetChangedError:
            listing = getattr(self.stream.loader, "dataset_listing", lambda: None)()
            change = describe_change(rank_state.get("dataset_listing"), listing) if listing is not None else ""
        if self.config.data.on_dataset_change == "refuse":
            raise SetupError(f"--resume: the training shards changed since {self.ckpt_dir / tag} was saved: {change}. "
                             f"To keep the model, optimizer and step and start the data stream afresh on the "
                             f"shards there are now, add --set data.on_dataset_change=restart")
        self.stream.epoch = rank_state["data"]["epoch"] + 1
        self.logger.info(f"data.on_dataset_change=restart: the training shards changed since {tag} ({change}); "
                         f"the data stream starts afresh at epoch {self.stream.epoch}")

    def save(self) -> Path:
        client_state = {"step": self.step, "epoch": self.stream.epoch, "skipped_total": self.skipped_total,
                        "bad_samples_total": self.bad_samples_total, "config": config_to_dict(self.config),
                        "model_spec": self.spec, "dataset": self.dataset_card}
        rank_state = {"data": self.stream.state_dict()}
        if self.rank == 0 and hasattr(self.stream.loader, "dataset_listing"):  # to say what changed at a resume
            rank_state["dataset_listing"] = self.stream.loader.dataset_listing()
        self.activity = f"while saving the checkpoint of step {self.step}"
        folder = self.manager.write(self.engine, self.step, client_state, rank_state)
        self._inject_kill("write")
        abandoned = self.manager.commit(self.step, self.config.training.global_batch_size, after=self._inject_kill)
        self.activity = None
        self.last_saved_step = self.step
        self.logger.info(f"saved checkpoint {folder}")
        if abandoned:
            self.logger.info(f"removed checkpoints of an abandoned run (newer than the one resumed): {abandoned}")
        return folder

    def _inject_kill(self, point: str) -> None:
        """Fault injection (faults.kill_*): SIGKILL this rank at `point` ("step" or a save stage) of that step."""
        f = self.config.faults
        if self.step == f.kill_at_step and self.rank == f.kill_rank and point in ("step", f.kill_point):
            os.kill(os.getpid(), signal.SIGKILL)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches; metrics summed over ranks.

        Loss sums and the non-finite count stay on the device; the one host synchronisation per
        step is the all-reduce that makes every rank agree on them and on preemption.
        """
        cfg = self.config
        names = ("loss", "mae", "cls")
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)  # + non-finite count
        lr = self.engine.get_lr()[0]
        faults = cfg.faults
        poison = self.step in faults.nonfinite_steps and (faults.nonfinite_ranks is None
                                                          or self.rank in faults.nonfinite_ranks)
        for micro in range(cfg.training.gradient_accumulation_steps):
            batch = next(self.stream)
            if self.key_log is not None:
                with writing(self.key_log_path, "sample keys"):
                    self.key_log.write(json.dumps({"step": self.step + 1, "micro": micro, "epoch": self.stream.epoch,
                                                   "keys": list(batch["key"]), "time": time.time()}) + "\n")
            inputs, targets = self.augment.train(model_inputs(batch, self.modalities, self.device, self.dtype),
                                                 labels_of(batch, self.objective.multi_label, self.device),
                                                 cfg.run.seed, self.rank, self.step, micro)
            g = seeded_generator(self.device, cfg.run.seed, self.rank, self.step, micro)
            parts = self.objective.losses(self.engine, self.module, inputs, targets, g)
            loss = parts["loss"]
            if poison:
                loss = loss * float("nan")
            # A non-finite loss poisons every gradient (scaled by a NaN constant, decided on the
            # device: no host sync), so DeepSpeed's global-norm check skips the update on all ranks;
            # only finite micro-losses enter the logged means.
            finite = torch.isfinite(loss).detach()
            loss = loss * torch.where(finite, 1.0, float("nan"))
            self.engine.backward(loss)
            self.engine.step()
            values = [loss if k == "loss" else parts.get(k, loss.new_zeros(())) for k in names]
            sums += torch.stack([torch.where(finite, v.detach(), 0.0).double() for v in values]
                                + [(~finite).double()])
        applied = self.engine.was_step_applied()
        bad = self.stream.loader.bad_samples - self._bad_seen
        self._bad_seen += bad
        flags = torch.tensor([float(self.preemption.raised), bad], dtype=torch.float64, device=self.device)
        totals = all_reduce_sum(torch.cat([sums, flags]))
        n = self.world_size * cfg.training.gradient_accumulation_steps - totals[3]  # finite micro-losses
        mean = [t / n if n else math.nan for t in totals[:3]]
        return {"loss": mean[0], "mae": mean[1], "cls": mean[2], "nonfinite": totals[3],
                "applied": float(applied), "preempt": totals[4], "bad": totals[5], "lr": lr}

    def _guard(self, metrics: dict[str, float]) -> None:
        """Count unreadable samples and skipped steps (all-reduced); stop past their limits."""
        if metrics["bad"]:
            self.bad_samples_total += int(metrics["bad"])
            limit = self.config.data.max_bad_samples
            self.logger.info(f"step {self.step}: {int(metrics['bad'])} unreadable samples skipped "
                             f"({self.bad_samples_total} in this run over all ranks, limit {limit})")
            if self.bad_samples_total > limit:
                raise TooManyBadSamples(f"stopped at step {self.step}: {self.bad_samples_total} unreadable "
                                        f"training samples over all ranks, more than data.max_bad_samples={limit}; "
                                        f"each is named in the ranks' logs")
        if metrics["applied"]:
            self.skipped_in_a_row = 0
            return
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        self.logger.info(f"step {self.step}: non-finite loss or gradient, update skipped "
                         f"({self.skipped_in_a_row} in a row, {self.skipped_total} in total)")
        limit = self.config.training.max_consecutive_nonfinite
        if self.skipped_in_a_row >= limit:
            raise NonFiniteError(f"stopped at step {self.step}: {limit} consecutive steps had a non-finite loss or "
                                 f"gradient (training.max_consecutive_nonfinite={limit})")

    def _log(self, metrics: dict[str, float], samples: int, seconds: float) -> None:
        figures = throughput(samples, seconds, self.flops_per_sample, self.inputs_per_sample, self.world_size,
                             peak_tflops(self.config.logging.peak_tflops))
        kind, mem = memory_gib()
        scalars = {"loss": metrics["loss"]}
        scalars.update({k: metrics[k] for k in ("mae", "cls") if k in self._loss_parts})
        grad_norm = self.engine.get_global_grad_norm()
        scalars.update(lr=metrics["lr"], grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                       samples_per_s=figures["samples_per_s"], inputs_per_s=figures["inputs_per_s"],
                       tflops=figures["tflops_per_device"])
        if "mfu" in figures:
            scalars["mfu"] = figures["mfu"]
        scalars[f"{kind}_mem_gib"] = mem
        scalars["skipped"] = self.skipped_total
        scalars["bad_samples"] = self.bad_samples_total
        scalars["world_size"] = self.world_size
        scalars["grad_accumulation"] = self.config.training.gradient_accumulation_steps
        self.logger.log(self.step, "train", scalars)

    @property
    def _loss_parts(self) -> tuple[str, ...]:
        o = self.config.objectives
        return tuple(k for k, w in (("mae", o.mae_weight), ("cls", o.classification_weight)) if w > 0)

    def prepare(self, batch: dict) -> dict:
        """Evaluation inputs {name: [B, M, C]} of a loader batch: normalised, on the device, centre clip window."""
        return self.augment.evaluation(model_inputs(batch, self.modalities, self.device, self.dtype))

    def preempted_anywhere(self) -> bool:
        """Collective: has any rank received a preemption signal?"""
        return all_reduce_max(float(self.preemption.raised), self.device) > 0

    def evaluate(self, final: bool = False) -> bool:
        """Evaluate on a fresh eval loader (every evaluation sees the same batches).

        Args:
            final: the evaluation after the last step (for the reports).

        Returns:
            False if a preemption signal interrupted it (nothing is logged then), else True.

        Raises:
            EvaluationError: the evaluation itself failed (its loader, data or metric; not a lost peer).
        """
        if not self.has_eval:
            return True
        self.activity = f"in the final evaluation, after step {self.step}" if final else \
            f"in the evaluation at step {self.step}"
        self.logger.info(f"evaluating at step {self.step}")
        try:
            loader = build_loader(self.config, "eval", self.rank, self.world_size)
            n = eval_batch_count(loader, self.config.eval.max_batches, self.device)
            examples: dict = {}
            metrics = evaluate(self.engine, self.module, loader, self.objective, self.prepare, n,
                               self.config.run.seed, self.device, stop=self.preempted_anywhere, examples=examples)
            if metrics is None:
                self.logger.info(f"evaluation at step {self.step} interrupted by the preemption signal")
                self.activity = None
                return False
            self.logger.log(self.step, "eval", metrics)
            for reason in undefined_metrics(metrics):
                self.logger.info(f"eval step {self.step}: {reason}")
            self._draw_pictures(examples)
        except Exception as e:
            if not is_own_failure(e):
                raise
            saved = self.manager.latest()
            kept = (f"is saved in {self.ckpt_dir / saved}" if saved else "is not saved (no checkpoint yet)")
            exported = " and exported" if final and self.config.checkpoint.export_at_end and saved else ""
            cause = (str(e).strip().splitlines() or [""])[0][:300]
            raise EvaluationError(f"the evaluation at step {self.step} failed; the training up to step "
                                  f"{self.last_saved_step} {kept}{exported} ({type(e).__name__}: {cause})") from e
        self.activity = None
        return True

    def _draw_pictures(self, examples: dict) -> None:
        """MAE reconstructions of the first eval samples and the position embeddings' principal components
        (collective under ZeRO-3, which gathers the position embeddings; rank 0 writes)."""
        count = self.config.logging.pictures
        if count == 0:
            return
        encoder = self.module.position_encoder
        encodings = {}
        with deepspeed.zero.GatheredParameters(list(encoder.parameters()), modifier_rank=None), torch.no_grad():
            for name, table in encoder.pos_embs.items():  # [M, E], projected as the model does (no module call)
                projection = encoder.projections[name].weight if encoder.projections is not None else None
                encodings[name] = (table.float() @ projection.float().T if projection is not None
                                   else table.float()).detach().cpu().clone()  # a copy: ZeRO-3 repartitions
        pictures = position_embedding_pictures(encodings, self.augment.shapes)
        if examples:
            pictures.update(reconstruction_pictures(examples["inputs"], examples["masks"],
                                                    examples["reconstruction"], self.augment.shapes, count))
        folder = self.run_dir / "pictures" / ckpt.tag_for(self.step)
        if self.logger.pictures(self.step, pictures, folder):
            self.logger.info(f"pictures of step {self.step}: {folder} (and TensorBoard's Images tab)")

    def resume_hint(self) -> str:
        """Which checkpoint a `--resume auto` continues from, for the report of a failure."""
        try:
            tag = self.manager.latest()
        except ckpt.CheckpointError as error:
            return f"no checkpoint to resume from: {error}"
        if tag is None:
            return "no checkpoint was saved yet: a new start begins at step 0"
        return f"the newest complete checkpoint is {self.ckpt_dir / tag}: --resume auto continues from it"

    def _stop_for_preemption(self) -> str:
        """Save (unless this step is saved already) and report "preempted"."""
        if self.last_saved_step < self.step:
            self.logger.info(f"preemption signal received at step {self.step}; saving")
            self.save()
        else:
            self.logger.info(f"preemption signal received at step {self.step}; its checkpoint is saved already")
        return "preempted"

    def fit(self) -> str:
        """Train to training.steps; returns "done" or "preempted".

        From here on a preemption signal is acted on at the next step boundary, after a save that is under way,
        and between eval batches: the run saves a checkpoint and returns. (Before, it ends the process.)
        """
        cfg = self.config
        self.preemption.install()  # before this, a stop signal ends the process (nothing trained to save)
        self.engine.train()
        global_batch = cfg.training.global_batch_size
        window_start, window_steps = time.perf_counter(), 0
        first_step = self.step + 1
        while self.step < cfg.training.steps:
            metrics = self.train_step()
            self.step += 1
            window_steps += 1
            if self.step == first_step and self.records is not None and self.rank == 0:
                self._log_start()
            self._guard(metrics)
            if metrics["preempt"] or self.step % cfg.logging.every_steps == 0 or self.step == cfg.training.steps:
                get_accelerator().synchronize()
                now = time.perf_counter()
                self._log(metrics, window_steps * global_batch, now - window_start)
                window_start, window_steps = now, 0
            if metrics["preempt"]:
                return self._stop_for_preemption()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
                if self.preempted_anywhere():  # the signal came during the save
                    return self._stop_for_preemption()
            self._inject_kill("step")
            time.sleep(cfg.faults.step_delay_s)
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < cfg.training.steps:
                if not self.evaluate():
                    return self._stop_for_preemption()
        if cfg.checkpoint.save_at_end and self.last_saved_step < self.step:
            self.save()
        if cfg.checkpoint.export_at_end:  # before the final evaluation: its failure must not cost the export
            self.export()
        if not self.evaluate(final=True):
            return self._stop_for_preemption()
        return "done"

    def _log_start(self) -> None:
        """After the first step of an elastic start (rank 0): record the start and print the restart line."""
        t = self.config.training
        event = self.records.first_step_done(self.world_size, self.hosts, t.gradient_accumulation_steps,
                                             t.global_batch_size, self.resumed_from)
        if event is not None:
            self.logger.info(describe_restart(event))
            self.logger.event(self.step, "elastic", event)

    def export(self) -> None:
        """Consolidate the newest complete checkpoint into `<run dir>/export/model.pt` (rank 0)."""
        tag = self.manager.latest()
        if tag is None:
            self.logger.info("export skipped: no complete checkpoint (checkpoint.save_at_end is false)")
            return
        self.activity = f"while exporting {tag}"
        probe = self._probe()
        if self.rank == 0:
            out = export_weights(self.ckpt_dir, tag, self.run_dir / "export" / "model.pt")
            with writing(out, "the export's probe batch"):
                torch.save(probe, out.with_name("probe.pt"))
            self.logger.info(f"exported weights of {tag} to {out}")
        dist.barrier()
        self.activity = None

    @torch.no_grad()
    def _probe(self) -> dict:
        """This rank's first training batch (centre clip window) and the engine's eval-mode outputs on it, on the
        CPU, with the engine's compute dtype (hipscale.training.export.probe_difference compares an export with
        it). The training shards, not the eval ones: an export does not depend on the eval set being readable."""
        loader = build_loader(self.config, "train", self.rank, self.world_size)
        batch = next(iter(loader))
        feed = self.objective.feed(self.prepare(batch))
        self.engine.eval()
        out = self.engine(feed)["reconstruction"]
        self.engine.train()
        return {"inputs": {k: v.float().cpu() for k, v in feed.items()},
                "outputs": {k: v.float().cpu() for k, v in out.items()},
                "dtype": str(self.dtype).removeprefix("torch.")}

    def close(self) -> None:
        """Stop the loader's worker processes and flush the logs."""
        self.activity = f"closing its logs after step {self.step}"
        self.stream.close()
        self.logger.close()
        if self.key_log is not None:
            with writing(self.key_log_path, "sample keys"):
                self.key_log.close()
