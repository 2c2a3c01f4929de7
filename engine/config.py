"""Typed configs, one per command, read from YAML and overridable from the command line.

Every config forbids unknown keys: a typo in a YAML file or a `--set` flag is an error that
names the key (and the closest valid one), never a silently ignored setting.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, ValidationError

from engine import storage
from engine.errors import SiftError


# A place sift reads or writes: a local path, file://, s3:// or gs:// (a string, never a Path,
# which would turn s3://b/x into s3:/b/x). Paths given by Python callers are accepted as strings.
# storage.validate_uri turns a mangled `s3:/b/x` into a one-line error.
Uri = Annotated[str, BeforeValidator(storage.validate_uri)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeConfig(StrictModel):
    """Where work runs. No address (and no RAY_ADDRESS) means an embedded local Ray."""

    address: str | None = None
    num_cpus: PositiveInt | None = Field(None, description="embedded Ray only; default: all cores")
    num_gpus: int | None = Field(None, ge=0, description="embedded Ray only; default: detected")
    max_failures: int = Field(2, ge=-1, description="retries after a worker or node failure: of a Ray Train run "
                                                    "(from its last checkpoint) and of each Ray Tune trial; -1: "
                                                    "no limit")
    checkpoints: Uri | None = Field(None, description="storage every node sees (s3://, gs://, a shared mount) for "
                                                      "Ray Train checkpoints and Ray Tune experiments; default: "
                                                      "under the stage's output")


class SchemaConfig(StrictModel):
    """Which input columns hold the example fields; any other column is kept as metadata."""

    text: str = "text"
    id: str = "id"
    task: str = "task"
    label: str = "label"
    split: str = "split"


class IngestConfig(StrictModel):
    inputs: list[str] = Field(default_factory=list, description="files, folders or globs")
    corpora: list[Literal["tweets", "chatterbot", "fortunes", "wordnet"]] = Field(
        default_factory=list, description="built-in corpora ingested besides the inputs")
    out: Uri | None = None
    columns: SchemaConfig = Field(default_factory=SchemaConfig)
    encoding: str = Field("utf-8", description="text encoding of jsonl/csv inputs")
    max_chars: PositiveInt = Field(20_000, description="longer texts are quarantined")
    max_line_bytes: PositiveInt = Field(4 << 20, description="longer jsonl/csv lines are quarantined, never read whole")
    labels: list[str] | None = Field(None, description="allowed labels; others are quarantined")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class LoraSpec(StrictModel):
    """A LoRA adapter; the same spec and seed give the same initial adapter anywhere."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = Field(None, description="transformer layers to adapt; default all")
    seed: int = 0


class FeaturizeConfig(StrictModel):
    """What embedding and gradient featurization share: sharding, batching, the store."""

    data: Uri | None = Field(None, description="an ingest folder (examples.parquet) or a parquet file")
    out: Uri | None = None
    model: str | None = None
    shard_rows: PositiveInt = Field(1024, description="rows per store shard: the unit of resumption")
    batch_size: PositiveInt = 32
    max_length: PositiveInt = 256
    dtype: Literal["float32", "float16"] = "float32"
    actors: PositiveInt | None = Field(None, description="actor pool size (the most actors with min_actors); "
                                                         "default: sized from Ray's resources")
    min_actors: PositiveInt | None = Field(None, description="an autoscaling pool of min_actors..actors; default: "
                                                             "a fixed pool")
    gpus_per_actor: float | None = Field(None, gt=0, description="GPUs every actor asks for, whether or not the "
                                                                 "cluster has any now (an autoscaler starts them); "
                                                                 "default: one per GPU present, else none")
    trust_remote_code: bool = False
    force: bool = Field(False, description="discard an existing store at OUT and start over")
    replace_mismatch: bool = Field(False, description="replace a store at OUT made for another request instead of "
                                                      "refusing it (set by the executor when OUT holds this stage's "
                                                      "own finished run); one made for this request is resumed")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class EmbedConfig(FeaturizeConfig):
    model: str | None = "minilm"
    normalize: bool = Field(True, description="L2-normalise embeddings (cosine = inner product)")
    batch_size: PositiveInt = 64


class GradsConfig(FeaturizeConfig):
    adapter: Uri | None = Field(None, description="a PEFT adapter folder as the anchor; default: a fresh seeded LoRA")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantize: Literal["none", "nf4"] = "none"
    dim: PositiveInt = Field(400, description="projection dimension d")
    seed: int = Field(0, description="projection seed")
    method: Literal["hooks", "vmap", "loop"] = "hooks"
    prompt: str = Field("{text}\nAnswer:", description="format string over the row's text, task, label")
    answer: str = Field(" {label}", description="format string of the gold answer")
    objective: Literal["answer", "labels"] = Field(
        "answer", description="the output f whose gradient is stored: answer: the gold answer tokens' log-odds over "
                              "the vocabulary; labels: the gold label's log-odds among its task's labels (their "
                              "answers' first tokens; for classification tasks, what the ensemble trains on)")
    batch_size: PositiveInt = 8
    max_length: PositiveInt = 128
    projection_cache_mb: float = Field(2048, gt=0)


class SelectPoolConfig(StrictModel):
    """`sift select-pool`: choose `budget` candidates of a pool for a target distribution."""

    pool: Uri | None = Field(None, description="texts (files/folders/globs), an ingest folder, an embedding store, "
                                               "or parquet with id + embedding columns; local or a URI")
    target: Uri | None = Field(None, description="same kinds of input as pool")
    budget: float | None = Field(None, gt=0, description="rows to select; a value below 1 is a fraction of the pool")
    out: Uri | None = None
    method: Literal["gotd", "knn", "dsir", "grad-cosine", "random"] = "gotd"
    variant: Literal["clean", "contrast"] = Field("clean", description="contrast: select away from the target")
    encoder: str = Field("minilm", description="sentence encoder for text inputs")
    eps: float = Field(0.1, gt=0, description="entropic regularisation (absolute)")
    threshold: float = Field(1e-3, gt=0, description="Sinkhorn stops when the L1 violation of both marginals "
                                                     "of the plan is at most this")
    max_iter: PositiveInt = Field(2000, description="Sinkhorn iterations at most; select-pool warns if the "
                                                    "threshold is not reached by then")
    full_max: PositiveInt = Field(20_000, description="pools up to this size are solved whole")
    support: Literal["sample", "kmeans"] = Field("sample", description="how larger pools are summarised")
    support_size: PositiveInt = Field(10_000, description="points in the sample or coreset")
    domain_keep: PositiveInt | None = Field(None, description="domain test: keep the N sources (task column) "
                                                               "closest to the target in OT cost; default off")
    domain_sample: PositiveInt = Field(2_000, description="rows per source for the domain test")
    knn_k: PositiveInt = 10
    dsir_buckets: PositiveInt = 10_000
    force: bool = Field(False, description="also redo the stages select-pool derives from texts (ingest, embed) "
                                           "under OUT/pool and OUT/target")
    pool_grads: Uri | None = Field(None, description="gradient store of the pool (grad-cosine)")
    target_grads: Uri | None = Field(None, description="gradient store of the target (grad-cosine)")
    seed: int = 0
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class SuiteConfig(StrictModel):
    """`sift suite`: the built-in multi-task suite as an ingest folder."""

    out: Uri | None = None
    per_task: PositiveInt = 400
    validation: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.0, ge=0, lt=1, description="share of each task held out as split 'test' (sift evaluate)")
    tasks: list[str] | None = None
    noisy_groups: int = Field(0, ge=0, description="extra tasks cut from wordnet-animal-plant")
    noisy_shuffled: int = Field(0, ge=0, description="how many of those get random labels")
    seed: int = 0
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class EstimatorFit(StrictModel):
    """How the estimator fits a subset's w (docs/ALGORITHMS.md section 2, step 5)."""

    method: Literal["logistic", "gradex"] = Field("logistic", description="logistic: the offset logistic model "
                                                  "with lam; gradex: the EMNLP code's variant (f* = 0, sklearn C)")
    gradex_c: float = Field(1e-4, gt=0, description="gradex: sklearn's C")
    update_norm: float | None = Field(None, gt=0, description="rescale every update to |P w| = this x the anchor "
                                                              "adapter's norm (the EMNLP code: 0.02-0.5); default off")
    radius: float | None = Field(None, gt=0, description="hold every logistic fit to |w| <= radius: the size of the "
                                                         "real fine-tune an estimate stands for, in the estimator's "
                                                         "coordinates (|P^T (theta - theta*)|; `estimate --calibrate` "
                                                         "measures it); default off (the fit converges)")


class SelectTasksConfig(StrictModel):
    """`sift select-tasks`: which training tasks help the target, by the first-order estimator."""

    data: Uri | None = Field(None, description="the examples (ingest folder or parquet) with task and split")
    grads: Uri | None = Field(None, description="their gradient store (`sift featurize grads`)")
    target: list[str] = Field(default_factory=list)
    out: Uri | None = None
    search: Literal["random", "forward", "tune"] = "random"
    units: Literal["tasks", "clusters"] = Field("tasks", description="what a subset is made of: whole tasks, or "
                                                                     "clusters of the candidates' gradients")
    clusters: PositiveInt = Field(20, description="with units=clusters: agglomerative clusters (cosine, average)")
    eval: Literal["linear", "forward"] = Field("linear", description="forward: also score the final choices by "
                                                                     "loading theta* + P w into the model")
    subsets: PositiveInt = Field(200, description="random subsets to estimate")
    ratio: float = Field(0.5, gt=0, le=1, description="share of the candidate tasks in each random subset")
    lam: float = Field(1e-3, gt=0, description="L2 strength of the subset fit")
    fit: EstimatorFit = Field(default_factory=EstimatorFit)
    keep: float | None = Field(None, gt=0, le=1, description="random/tune search: keep this share of the candidates "
                                                             "with the best random-ensemble score (the reference: "
                                                             "0.7-0.95); default: those whose score is <= 0")
    top_up: int = Field(0, ge=0, description="top tasks up to this many training rows by averaging pairs")
    seed: int = 0
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class GroupConfig(StrictModel):
    """`sift group`: split the tasks of a gradient store into m groups for the adapter ensemble."""

    data: Uri | None = None
    grads: Uri | None = None
    out: Uri | None = None
    groups: PositiveInt | None = Field(None, description="m; default: the fewest groups whose estimated validation loss is within one standard error of the lowest")
    max_groups: PositiveInt = Field(6, description="largest m tried when m is not given")
    method: Literal["sdp", "spectral"] = Field("sdp", description="clustering of the affinity before refinement")
    subsets: PositiveInt = Field(100, description="random subsets estimated for the affinity")
    ratio: float = Field(0.3, gt=0, le=1, description="share of the tasks in each random subset")
    restarts: int = Field(4, ge=0, description="random partitions also refined by local search, besides the "
                                               "SDP and spectral ones")
    rounds: PositiveInt = Field(20, description="local-search rounds per start")
    lam: float = Field(1e-3, gt=0, description="L2 strength of every fit")
    top_up: int = Field(0, ge=0, description="top tasks up to this many training rows by averaging pairs")
    seed: int = 0
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class CalibrateConfig(StrictModel):
    """`sift estimate --calibrate`: how good is the estimator here? Approximation error of the
    first-order model, and estimates against real LoRA fine-tunes of the same subsets."""

    data: Uri | None = None
    grads: Uri | None = None
    target: list[str] = Field(default_factory=list)
    out: Uri | None = None
    subsets: PositiveInt = Field(8, description="subsets fine-tuned for real")
    ratio: float = Field(0.5, gt=0, le=1)
    lam: float = Field(1e-3, gt=0)
    fit: EstimatorFit = Field(default_factory=EstimatorFit)
    scales: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0],
                                description="update sizes (multiples of the fitted w) for the approximation error")
    eval_rows: PositiveInt = Field(200, description="target validation rows used for the approximation error")
    steps: PositiveInt = Field(60, description="optimizer steps of each real fine-tune (cross-entropy on the "
                                               "answer tokens, the same training rows as the estimate)")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate of the real fine-tunes")
    eval_every: PositiveInt = Field(10, description="steps between points of each fine-tune's target-loss curve")
    batch_size: PositiveInt = 16
    seed: int = 0
    seeds: PositiveInt = Field(1, description="real fine-tunes of each subset (batch orders seed, seed + 1, ...): "
                                              "the real loss is their mean, the seeds' own Spearman the ceiling")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class LoraTrainConfig(StrictModel):
    """`sift train-lora`: one LoRA (or QLoRA) fitted on tasks' training rows with Ray Train; the
    multitask meta-initialisation anchor of the estimator, and the unit of the adapter ensemble."""

    data: Uri | None = None
    out: Uri | None = None
    model: str | None = None
    adapter: Uri | None = Field(None, description="start from this adapter instead of a fresh LoRA")
    tasks: list[str] | None = Field(None, description="tasks to train on; default all")
    objective: Literal["answer", "labels", "lm"] = Field(
        "answer", description="answer: CE on the answer tokens; labels: CE of the gold label among the task's "
                              "labels (the ensemble's class probability); lm: causal LM loss over the whole text")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantize: Literal["none", "nf4"] = "none"
    prompt: str = "{text}\nAnswer:"
    answer: str = " {label}"
    max_length: PositiveInt = 128
    epochs: PositiveInt = 2
    steps_per_epoch: PositiveInt | None = Field(None, description="default: one pass over the training rows")
    batch_size: PositiveInt = 16
    lr: float = Field(1e-3, gt=0)
    workers: PositiveInt = Field(1, description="Ray Train workers (data parallel, gloo on CPU)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per Ray Train worker (0: train on CPUs)")
    trust_remote_code: bool = False
    seed: int = 0
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class EnsembleTrainConfig(StrictModel):
    """`sift train`: one LoRA/QLoRA per group, trained concurrently with Ray Train; per-task
    mixture weights fitted on validation rows; optional boosting; writes ensemble.json."""

    groups: Uri | None = Field(None, description="a `sift group` output folder (groups.json)")
    partition: list[list[str]] | None = Field(None, description="explicit groups of tasks instead of --groups")
    data: Uri | None = Field(None, description="default: the data groups.json was built from")
    grads: Uri | None = Field(None, description="gradient store whose anchor (model, LoRA, prompt) the adapters "
                                                 "start from; default: the one of groups.json")
    out: Uri | None = None
    quantize: Literal["none", "nf4"] = Field("none", description="nf4: QLoRA (4-bit base)")
    objective: Literal["labels", "answer"] = Field(
        "labels", description="the group adapters' loss: labels: CE of the gold label among the task's labels "
                              "(what the ensemble scores); answer: CE on the answer tokens")
    epochs: PositiveInt = 3
    steps_per_epoch: PositiveInt | None = None
    batch_size: PositiveInt = 16
    lr: float = Field(1e-3, gt=0)
    workers: PositiveInt = Field(1, description="Ray Train workers per group")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per Ray Train worker (0: train on CPUs)")
    boost: int = Field(0, ge=0, description="boosting rounds (closed-form residual adapters)")
    boost_alpha: float = Field(1.0, gt=0, description="ridge strength of a boosting adapter, relative to the mean "
                                                       "eigenvalue of X^T X (X: the training rows' label-set "
                                                       "log-odds gradients)")
    boost_max_step: float = Field(32.0, gt=0, description="largest step size nu of the line search on validation "
                                                           "rows; nu scales the capped adapter's change in label-logit "
                                                           "space, so nu > 1 goes further without a larger |P w|")
    boost_max_norm: float = Field(1.0, gt=0, description="a boosting adapter's |P w| is capped at this multiple of "
                                                         "the group adapters' median distance from the anchor")
    seed: int = 0
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class ServeConfig(StrictModel):
    """`sift serve`: an adapter ensemble (ensemble.json) behind an HTTP API on Ray Serve."""

    manifest: Uri | None = Field(None, description="ensemble.json or the folder holding it")
    backend: Literal["vllm", "peft"] = Field("vllm", description="vllm: multi-LoRA batching; peft: the "
                                                                 "transformers + PEFT reference")
    host: str = Field("127.0.0.1", description="HTTP bind address (loopback by default)")
    port: int = Field(8000, ge=1, le=65535)
    max_lora_rank: PositiveInt | None = Field(None, description="LoRA slot size; default: the manifest's "
                                                                "max_lora_rank; a manifest above it is refused")
    max_prompt_chars: PositiveInt = Field(8000, description="longer texts or prompts are refused (413)")
    max_batch: PositiveInt = Field(32, description="texts per classify request, prompts per completion")
    max_tokens: PositiveInt = Field(256, description="the most tokens a completion may ask for")
    max_model_len: PositiveInt | None = Field(None, description="context length; default: the model's, "
                                                                "at most 4096")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vllm: auto is float32 on CPU, bfloat16 on GPU")
    max_num_seqs: PositiveInt = Field(128, description="vllm: sequences batched per step")
    kv_cache_gib: float = Field(1.0, gt=0, description="vllm on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    replicas: PositiveInt = 1
    replica_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per replica")
    replica_gpus: float | None = Field(None, ge=0, description="GPUs per replica, asked for whether or not the "
                                                               "cluster has any now (an autoscaler starts them); "
                                                               "default: 1 for vllm when a GPU exists now, else 0")
    max_ongoing_requests: PositiveInt = Field(32, description="requests a replica works on (or waits on) at once")
    max_queued_requests: PositiveInt = Field(64, description="requests queued for the replicas (per HTTP proxy) "
                                                             "beyond max_ongoing_requests; more get 503 + Retry-After")
    retry_after_s: PositiveInt = Field(1, description="the Retry-After of a 503 when the queue is full")
    request_timeout_s: float = Field(60.0, gt=0, description="a request still running after this gets 504 and "
                                                            "is cancelled")
    allow_swap: bool = Field(False, description="enable POST /v1/ensemble (needs SIFT_SERVE_TOKEN and manifest_root)")
    manifest_root: Path | None = Field(None, description="swaps load only manifests and adapters inside this "
                                                         "folder; the chosen manifest is remembered in "
                                                         "ROOT/.sift-serve/")
    threads: PositiveInt | None = Field(None, description="peft: torch threads; default: the machine's cores")
    trust_remote_code: bool = False
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class SampleConfig(StrictModel):
    """`sift sample`: a pool sampled from an ingest folder (stratified by task, so small sources
    are not drowned by large ones), with an optional target held out of it: the rows of one task
    and label, as a user holds out a labelled sample of what they care about."""

    data: str | None = Field(None, description="an ingest folder or a parquet file of examples")
    out: str | None = None
    rows: PositiveInt | None = Field(None, description="pool rows, stratified by task; default: every row")
    target_task: str | None = Field(None, description="hold out rows of this task as the target")
    target_label: str | None = Field(None, description="... with this label")
    target_rows: PositiveInt = Field(100, description="rows held out as the target (at most half the topic)")
    seed: int = 0


class PipelineStep(StrictModel):
    """One step of a pipeline: a registered stage and that command's own config. Relative paths
    in it are resolved against the pipeline's `out`, so steps name each other's outputs."""

    stage: str = Field(description="a registered stage: ingest, sample, embed, grads, select-pool, ...")
    name: str | None = Field(None, description="the step's name (default: the stage's); unique in the file")
    config: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(StrictModel):
    """`sift run pipeline.yaml` (`sift demo` runs configs/pipeline.yaml): its steps in order, each
    skipped when its fingerprint (its config and the fingerprints of what it reads) matches a
    finished run."""

    out: str = "runs/demo"
    only: list[str] | None = Field(None, description="run only these steps (default: all)")
    steps: list[PipelineStep] = Field(default_factory=list)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


C = TypeVar("C", bound=StrictModel)


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build a `cls` from an optional YAML file, then dotted-key overrides (`runtime.num_cpus`)."""
    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        where = str(path)
        data = read_yaml(Path(path))
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SiftError(f"config error in {where}: {describe(exc, cls)}") from None


def parse_set_flags(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML so `3`, `true`, `[a, b]` get their types."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SiftError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SiftError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise SiftError(f"config file {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SiftError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SiftError(f"config error: cannot set {key!r}: {part!r} is not a section")
    node[leaf] = value


def describe(exc: ValidationError, cls: type[StrictModel]) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = _closest(cls, err["loc"])
            parts.append(f"unknown key {loc!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
        elif err["type"] == "missing":
            parts.append(f"missing key {loc!r}")
        else:
            parts.append(f"key {loc!r}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def _closest(cls: type[StrictModel], loc: tuple) -> str | None:
    """The valid key nearest to a misspelt one, following nested sections."""
    model: Any = cls
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return ".".join([*map(str, loc[:-1]), match[0]]) if match else None
