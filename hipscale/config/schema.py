"""The typed training configuration: one dataclass per concern.

Every field has a type, a default and a docstring. `hipscale.config.loader`
fills these from YAML and `--set key=value` overrides and validates them;
`hipscale.training.ds_config` renders the DeepSpeed part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class RunConfig:
    name: str = "hip"
    """Run name; the run directory is `<output_dir>/<name>`."""

    output_dir: str = "runs"
    """Parent folder of run directories (resolved config, TensorBoard events, exports)."""

    seed: int = 0
    """Base seed of model initialisation, dropout, masking and data order."""


@dataclass
class ModelConfig:
    variant: Union[str, dict] = "Mini"
    """HiP variant: a name ("Mini", "16", "256", "16x3", "io_mini", ...) or a dict of per-block tuples
    (num_groups, num_self_attends_per_block, z_index_dim, num_z_channels, ...)."""

    num_position_encoding_channels: Optional[int] = None
    """Width of the shared bias-free position projection; null adds the raw position embedding."""

    regroup_type: Literal["reshape", "transpose_reshape"] = "reshape"
    """How a block merges neighbouring groups."""

    processor_index_dim_train: Optional[int] = None
    """Random subset of processor latents per example and group at train time (null: all)."""

    processor_index_dim_eval: Optional[int] = None
    """Number of processor latents at eval time (null: as trained)."""

    dropout_prob: float = 0.0
    """Dropout probability inside attention and MLP blocks."""

    drop_path_rate: float = 0.0
    """Stochastic depth rate."""

    init_from: Optional[str] = None
    """Start from the weights of another run (`--init-from`): its run folder, checkpoint folder, one checkpoint
    (`.../step_00001000`) or an export (`model.pt`). Tensors whose name and shape match are loaded; the others
    keep their fresh initialisation (e.g. a new class bottleneck after MAE pretraining), and tensors of the
    source that this model lacks are dropped; all three lists are printed. Ignored when resuming."""


@dataclass
class SyntheticDataConfig:
    modalities: dict = field(default_factory=lambda: {"image": [1024, 3]})
    """Modality name -> [index_dim, channels] of the generated raw inputs ("image"/"video" uint8, "audio" int16)."""

    num_classes: int = 10
    """Number of classes of the generated labels."""

    multi_label: bool = False
    """Generate multi-hot labels (AudioSet-like) instead of one class per sample."""

    num_samples: int = 1024
    """Samples per epoch (over all ranks)."""


@dataclass
class SourceConfig:
    dir: str = ""
    """Folder or s3://, gs://, http(s):// URL of this source's shards."""

    weight: float = 1.0
    """This source's share of every epoch's samples, relative to the other sources' weights."""


@dataclass
class DataConfig:
    source: Literal["shards", "synthetic"] = "shards"
    """"shards": webdataset shards made by `preprocess/`; "synthetic": generated in memory (benchmarks, smoke tests)."""

    train_dir: str = ""
    """Folder or s3://, gs://, http(s):// URL of the training shards (with the sharder's index.json).
    Credentials and endpoints of a URL come from the backend's standard environment (AWS_ENDPOINT_URL, ...)."""

    train_mix: list[SourceConfig] = field(default_factory=list)
    """Several training sources mixed by weight, instead of train_dir: an epoch has as many samples as the
    sources together, each source contributes its weighted share (repeating its samples or drawing a fresh
    subset every epoch), resumable like one source. Their modalities and classes must agree."""

    eval_dir: Optional[str] = None
    """Folder or URL of the evaluation shards; null disables evaluation."""

    micro_batch_size: int = 8
    """Samples per rank per micro-step (DeepSpeed train_micro_batch_size_per_gpu)."""

    num_workers: int = 2
    """Loader worker processes per rank."""

    shuffle_buffer: int = 1000
    """Samples held by the loader's shuffle buffer."""

    max_bad_samples: int = 100
    """Undecodable training samples the job may skip, counted over all ranks and saved in checkpoints; one
    more stops the run (exit status 4). Each is logged; eval reports its own count as `bad_samples`."""

    cache_dir: Optional[str] = None
    """Node-local folder caching the shards of URL datasets, shared by the node's ranks and loader workers
    (null: <temp dir>/hipscale-shard-cache)."""

    cache_limit_gb: float = 100.0
    """Most gigabytes (1e9 bytes) of shards the cache keeps; least recently used ones are evicted first."""

    prefetch_shards: int = 2
    """Shards each loader worker downloads ahead of the one it reads (URL datasets)."""

    remote_timeout_s: float = 60.0
    """Seconds one request to remote storage may wait to connect or for its next bytes."""

    remote_retry_s: float = 300.0
    """Seconds a remote read keeps retrying transient errors (timeouts, lost connections, 5xx answers) with
    backoff before it fails; a missing object or denied access fails at once."""

    worker_timeout_s: Optional[float] = 900.0
    """Seconds a loader worker may spend on one sample, or on fetching and opening one shard, before the rank
    kills it and fails, naming the worker, the shard and the sample (a decoder deadlock, a hung read of a
    network filesystem). It must cover the slowest legitimate read: a URL shard's download with its retries
    (remote_timeout_s, remote_retry_s). null: no limit."""

    on_dataset_change: Literal["refuse", "restart"] = "refuse"
    """When the training shards differ from those of the checkpoint resumed (shards added, removed or
    rewritten): "refuse" stops before the first step, saying what changed; "restart" keeps the model,
    optimizer, schedule and step and starts the data stream afresh at the next epoch on the shards there are
    now (a resume on the same shards keeps its exact position either way)."""

    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    """Shape of the generated data when source is "synthetic"."""


@dataclass
class ObjectiveConfig:
    mae_weight: float = 1.0
    """Weight of the masked-auto-encoding reconstruction loss (0 disables masking)."""

    classification_weight: float = 1.0
    """Weight of the classification loss (0: the model is built without a label bottleneck)."""

    mask_ratio: float = 0.75
    """Fraction of input positions whose content is dropped for the MAE loss (groupwise pattern).
    The HiP paper does not state it; 0.75 follows the MAE literature."""


@dataclass
class AugmentConfig:
    """Training-time augmentation, applied on the device to the normalised [B, M, C] inputs (the raw-input
    layout is kept). Every draw comes from a generator seeded by (run seed, rank, step, micro-step), so a step
    draws the same augmentation after a resume. Evaluation, the export probe and prediction see none of it
    (only the centre clip window). All off by default."""

    random_resized_crop: bool = False
    """Images: crop a random area (a crop_scale fraction of the image, aspect ratio within crop_ratio) and resize
    it back to the stored resolution (bilinear), per sample."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop's area, as a fraction of the image's."""

    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    """Range of the crop's aspect ratio (width / height), drawn log-uniformly."""

    horizontal_flip: bool = False
    """Images: mirror left-right with probability 0.5, per sample."""

    color_ops: int = 0
    """Images: RandAugment-style colour operations per sample (0: off); each is drawn from identity, brightness,
    contrast, saturation, solarize, posterize and autocontrast."""

    color_magnitude: float = 5.0
    """Strength of the colour operations on RandAugment's 0-10 scale."""

    mixup_alpha: float = 0.0
    """MixUp: blend each sample with another of the batch by lambda ~ Beta(alpha, alpha), every modality with the
    same lambda (audio and video together) and the targets likewise (0: off)."""

    cutmix_alpha: float = 0.0
    """CutMix (images): paste a box of another sample covering 1 - lambda of the image, lambda ~ Beta(alpha,
    alpha); targets mixed by the box's area (0: off)."""

    cutmix_switch_prob: float = 0.5
    """With both MixUp and CutMix on, the probability that a batch uses CutMix rather than MixUp."""

    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (MixUp or CutMix)."""

    label_smoothing: float = 0.0
    """Targets become (1 - eps) * target + eps / K (single- and multi-label alike)."""

    clip_seconds: Optional[float] = None
    """Audio/video: train on a window of this many seconds at a random offset inside the stored clip, when the
    shards hold a longer one (`preprocess/shard_av.py --window-seconds`); evaluation and prediction take the
    centre window. It must cover a whole number of the stored frames. Null: the whole stored clip."""


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "lamb"] = "adamw"
    """Optimizer: torch AdamW, or LAMB (hipscale.training.lamb)."""

    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam beta1, beta2."""

    eps: float = 1e-8
    """Adam epsilon."""

    weight_decay: float = 0.05
    """Decoupled weight decay."""

    grad_clip: float = 1.0
    """Clip the global gradient 2-norm to this value (0 disables)."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak learning rate over this many optimizer steps."""

    min_lr_ratio: float = 0.0
    """Cosine decay ends at peak lr times this ratio at training.steps."""


@dataclass
class TrainingConfig:
    steps: int = 1000
    """Total optimizer steps."""

    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all ranks (G), fixed for the whole run and stored in its checkpoints. At
    every start the gradient accumulation is G / (data.micro_batch_size x world size), so a run resumed on
    another number of ranks (--elastic, --universal) keeps its batch and its lr schedule; a world size that
    does not divide G / data.micro_batch_size stops the run before its first step (exit 2). null: G of the
    checkpoint resumed, or data.micro_batch_size x gradient_accumulation_steps x world size at a fresh start."""

    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step at a fresh start when global_batch_size is null (otherwise derived)."""

    max_consecutive_nonfinite: int = 5
    """Stop the run after this many optimizer steps in a row were skipped for a NaN/inf loss or gradient."""


@dataclass
class DistributedConfig:
    timeout_s: int = 1800
    """Seconds any rank waits for the others in a collective before the job fails, naming the step. It must
    cover the slowest legitimate wait: a first-step compile on one rank, a large checkpoint save, an eval."""

    heartbeat_timeout_s: int = 60
    """Seconds after which a rank that sent no heartbeat (a node that died or lost its network) ends the job,
    naming the rank and its node; also how long a rank waits for the first node's rendezvous store. Far
    shorter than timeout_s, because heartbeats come from a thread of their own that keeps beating through
    long collectives, compiles and saves. 0: off (a silent node then ends the job after timeout_s)."""


@dataclass
class FaultInjectionConfig:
    """Deliberate faults, for the tests of crash recovery and the NaN guard; all off by default."""

    nonfinite_steps: list[int] = field(default_factory=list)
    """Make the loss NaN at these (0-based) optimizer steps."""

    nonfinite_ranks: Optional[list[int]] = None
    """Ranks whose loss is made NaN at nonfinite_steps (null: every rank)."""

    kill_at_step: Optional[int] = None
    """Rank kill_rank SIGKILLs itself after this step, or during its save when a checkpoint is due there."""

    kill_rank: int = 0
    """The rank that kill_at_step kills."""

    kill_point: Literal["write", "complete", "latest"] = "write"
    """Where in the save of kill_at_step the kill happens: "write" (DeepSpeed's files written, not yet synced or
    marked), "complete" (COMPLETE written, `latest` not yet moved), "latest" (`latest` moved, old ones not pruned)."""

    step_delay_s: float = 0.0
    """Sleep this long after every optimizer step: a slower model, so that tests of resizes can act inside one
    epoch (0: off)."""

    stall_sample: Optional[str] = None
    """The loader worker about to decode the sample with this key blocks forever in native code holding the
    GIL, as a deadlocked decoder does (data.worker_timeout_s then names it)."""


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Parameter/compute precision: "auto" is bf16 on GPU and fp32 on CPU (CPU has no fp16/bf16 path here)."""


@dataclass
class ZeroConfig:
    stage: Literal[1, 2, 3] = 2
    """ZeRO stage: 1 optimizer states, 2 + gradients, 3 + parameters sharded over data-parallel ranks."""

    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states (and the step) on the CPU."""

    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters on the CPU (ZeRO-3 only)."""


@dataclass
class ActivationCheckpointConfig:
    policy: Literal["none", "all", "every_k", "outer"] = "none"
    """Which HiP blocks recompute activations in the backward pass: none, all blocks, every k-th block,
    or only the high-resolution outer blocks (num_groups >= min_groups)."""

    every_k: int = 2
    """For policy "every_k": checkpoint blocks 0, k, 2k, ..."""

    min_groups: int = 16
    """For policy "outer": checkpoint blocks with at least this many groups."""


@dataclass
class CompileConfig:
    policy: Literal["none", "blocks"] = "none"
    """torch.compile regionally: "blocks" compiles each HiP block's forward on its own (blocks of equal shape
    share their compiled code, so the first step stays short); "none" runs eager."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Folder of sharded DeepSpeed checkpoints; null means `<run dir>/checkpoints`."""

    every_steps: int = 1000
    """Save every N optimizer steps (0: only on preemption and at the end)."""

    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""

    save_at_end: bool = True
    """Save a checkpoint after the last step."""

    export_at_end: bool = True
    """Write consolidated fp32 weights (`<run dir>/export/model.pt`) after the last step."""

    checksums: bool = True
    """Record the size and CRC-32 of every checkpoint file in its COMPLETE marker at save time, so that a load
    (resume, export, predict, `python -m hipscale.training.verify`) finds files damaged since. Without them a load
    still refuses a file that would run code when unpickled."""


@dataclass
class LoggingConfig:
    every_steps: int = 10
    """Print one progress line (rank 0) and write TensorBoard scalars every N optimizer steps."""

    tensorboard: bool = True
    """Write TensorBoard event files to `<run dir>/tensorboard`."""

    pictures: int = 4
    """At every evaluation, MAE reconstructions of this many fixed eval samples (rank 0's first eval batch) beside
    their inputs, and the principal components of the learned position embeddings, go to TensorBoard (tab
    Images) and to `<run dir>/pictures/step_NNNNNNNN/*.png` (0: no pictures)."""

    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device for MFU; null uses the known peak of the detected GPU (bf16 dense), if any."""

    sample_keys: bool = False
    """Append the key of every training sample each rank draws, by step, micro-step and epoch, to
    `<run dir>/sample_keys/<start>_rank<R>.jsonl` (one file per rank and start): for checking the data
    accounting of resumed and resized runs."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate every N optimizer steps (0: only after the last step)."""

    max_batches: Optional[int] = None
    """Evaluate at most this many batches per rank (null: the whole eval set, every sample exactly once on any
    number of ranks: the last batches are padded and the padding masked, so the metrics do not depend on the
    world size)."""

    micro_batch_size: Optional[int] = None
    """Eval batch per rank (null: data.micro_batch_size)."""


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity and seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """HiP variant and options (passed to build_hip)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""

    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Losses and their weights."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time data augmentation (MixUp, CutMix, crops, flips, colour, label smoothing, clip windows)."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and gradient clipping."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule: linear warmup then cosine."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Step counts, gradient accumulation, NaN guard."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Process-group behaviour: how long a rank waits for the others."""

    faults: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)
    """Fault injection for tests."""

    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric precision."""

    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """ZeRO sharding and offload."""

    activation_checkpoint: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    """Activation-checkpointing policy over HiP blocks."""

    compile: CompileConfig = field(default_factory=CompileConfig)
    """Regional torch.compile of the HiP blocks."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Sharded checkpoints and export."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Progress line, TensorBoard, MFU."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation loop."""

    deepspeed_config: Optional[str] = "ds_config.json"
    """DeepSpeed JSON merged under this config (this config wins; conflicts are reported); null: none."""

