"""Typed run configurations. Defaults live here only: the CLI flags and the MLproject parameters are
derived from (and tested against) these dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rsseg.errors import ConfigError


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:  # noqa: A002
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class PrepareConfig:
    source: str = _opt("", "dataset folder in one of the seeds' layouts; empty: generate the embedded sea-ice dataset")
    out: str = _opt("", "output folder for the manifest; empty: data/prepared/<dataset name>")
    layout: str = _opt("auto", "folder layout", ("auto", "pairs", "palette", "change", "second"))
    task: str = _opt("", "binary, multiclass or change; empty: from the layout and masks")
    name: str = _opt("", "dataset name; empty: the source folder's name")
    tile_size: int = _opt(512, "tile size in pixels")
    overlap: int = _opt(64, "overlap between neighbouring tiles in pixels")
    folds: int = _opt(3, "number of scene-level folds (fold k: train_k / val_k)")
    val_fraction: float = _opt(0.1, "share of scenes in the holdout split (9:1 by default)")
    seed: int = _opt(0, "seed for the scene splits")
    classes: str = _opt("", "comma-separated class names (index order)")
    palette: str = _opt("", "palette JSON for colour-coded masks (builtin: dubai, deepglobe)")
    unknown_colors: str = _opt("error", "what to do with mask colours not in the palette", ("error", "ignore"))
    mask_threshold: int = _opt(-1, "binary masks: value >= this is the target class (-1: masks are 0/255 or 0/1)")
    bands: str = _opt("", "comma-separated 1-based band indexes in model order; empty: all bands")
    ignore_index: int = _opt(255, "class index ignored by losses and metrics")
    nodata: int = _opt(-1, "nodata value of the images (-1: none or from the files)")
    overwrite: bool = _opt(False, "replace an earlier prepare output at --out")


# validations=0 under a time budget: one per this many seconds, so a long budget still picks its epoch
# from a fine grid (LEVIR-CD at 1800 s peaked at 915 s of it and fell 5 points by the end), and never
# fewer than MIN_VALIDATIONS (a 600 s run keeps its 4).
SECONDS_PER_VALIDATION = 150.0
MIN_VALIDATIONS = 4


@dataclass
class TrainConfig:
    data: str = _opt("", "prepared dataset folder, or several joined by commas (the first is validated on; the others, "
                     "e.g. pseudo labels, add all their scenes to training); empty: the embedded sea-ice dataset")
    mix: str = _opt("", "with several datasets: samples per epoch from each, as shares (e.g. 1:1); empty: as many as "
                    "each holds")
    fold: int = _opt(-1, "validation fold (-1: the 9:1 holdout split)")
    architecture: str = _opt("", "model name in the registry; empty: unet (binary change: both dates' bands stacked; "
                               "siamese_unet for semantic change data)")
    encoder: str = _opt("", "timm encoder name; empty: the recipe's: efficientnet_lite0 for a UNet on "
                        "single-date data; hrnet_w18 for hrnet_ocr and siamese_pspnet; the seed's "
                        "tf_efficientnet_lite3 otherwise, change pairs included)")
    encoder_weights: str = _opt("", "encoder weights: a local file (.pth/.safetensors), or imagenet for timm's pretrained weights from the Hugging Face cache (downloaded when the hub is reachable)")
    init_from: str = _opt("", "start from a registered version (models:/NAME/VERSION or models:/NAME@ALIAS) and "
                          "fine-tune it, e.g. with another loss; its architecture, encoder and options are kept")
    encoder_depth: int = _opt(4, "encoder stages used by unet-style models (the seed drops the 5th)")
    check_export: bool = _opt(True, "export the new model to ONNX once before training, so one that could not be "
                              "promoted fails at once rather than after training")
    model_options: str = _opt("", "more architecture options as key=value pairs, e.g. kernel_size=3,attention=none")
    epochs: int = _opt(20, "number of epochs")
    batch_size: int = _opt(8, "tiles per batch (per process under torchrun)")
    lr: float = _opt(0.0, "peak learning rate; 0: the task's default (0.002; 0.001 for change pairs)")
    weight_decay: float = _opt(1e-4, "weight decay")
    optimizer: str = _opt("adamw", "optimizer", ("adamw", "sgd"))
    momentum: float = _opt(0.9, "SGD momentum")
    scheduler: str = _opt("cosine", "learning-rate schedule: cosine = linear warm-up, then cosine decay to 1 % at the "
                          "end of training (the time budget when set, else the last epoch)",
                          ("cosine", "cosine_restarts", "constant"))
    warmup: float = _opt(0.03, "share of training spent warming the learning rate up (cosine)")
    restart_epochs: int = _opt(10, "CosineAnnealingWarmRestarts T_0 in epochs")
    restart_mult: int = _opt(1, "CosineAnnealingWarmRestarts T_mult")
    teacher: str = _opt("", "distil from this teacher (models:/NAME/VERSION, @ALIAS, runs:/RUN_ID, or several joined by "
                        "commas: their logit average): the student also learns its soft logits")
    alpha: float = _opt(0.5, "with teacher: loss = (1 - alpha) x the labels' loss + alpha x the soft-target loss")
    temperature: float = _opt(2.0, "with teacher: softmax temperature of the soft targets")
    snapshots: bool = _opt(False, "snapshot ensemble (Huang et al. 2017, the land-cover seed's 'different local "
                           "optima'): the cosine schedule restarts `cycles` times over the run and the weights at the "
                           "end of each cycle are validated, logged and (with register) registered as versions")
    cycles: int = _opt(3, "cosine cycles (and snapshots) with snapshots=true")
    loss: str = _opt("ce+dice_present", "loss terms joined by +, each NAME or NAME:WEIGHT: ce, dice (class-wise Dice over all classes), "
                     "dice_present (over the classes in each batch's labels), focal, "
                     "lovasz (Lovász-softmax), edge_ce (cross-entropy smoothed more near class boundaries), "
                     "e.g. ce+lovasz:0.5")
    ce_weight: float = _opt(1.0, "scales the ce term of the loss")
    dice_weight: float = _opt(1.0, "scales the dice term of the loss")
    focal_gamma: float = _opt(2.0, "focusing exponent of the focal term")
    edge_smoothing: float = _opt(0.2, "label smoothing of edge_ce on pixels within 2 px of another class")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing")
    class_weights: str = _opt("", "comma-separated cross-entropy class weights; empty: none")
    augment: str = _opt("auto", "comma-separated augmentations (hflip, vflip, rot90, transpose, scale: zoom "
                       "0.75-1.33x, rotate: any angle up to 45 degrees, jitter: brightness/contrast/band gains, "
                       "swap_dates: binary change pairs also seen as B -> A; none), or auto: the task's default "
                       "(hflip,rot90; change pairs also scale,jitter)")
    sampling: str = _opt("random", "training windows: random positions anywhere in the training scenes, new each "
                         "epoch, or the prepared tile grid", ("random", "grid"))
    crop_size: int = _opt(0, "size of the random training windows (0: the prepared tile size)")
    normalization: str = _opt("spec", "per-band mean/std: the spec's (127.5/31.875) or measured", ("spec", "dataset"))
    precision: str = _opt("auto", "bf16 autocast, fp32, or auto: bf16 where the device computes it natively (CPUs "
                          "with AVX-512 BF16 or AMX, CUDA devices with bf16), else fp32", ("auto", "fp32", "bf16"))
    channels_last: bool = _opt(True, "channels-last memory format (faster convolutions on CPU and GPU)")
    ema_decay: float = _opt(0.995, "exponential moving average of the weights, validated and registered; 0: off")
    seed: int = _opt(0, "random seed")
    workers: int = _opt(0, "data-loading worker processes")
    max_train_tiles: int = _opt(0, "use at most this many training tiles per epoch (0: all)")
    max_val_tiles: int = _opt(0, "validate on at most this many tiles (0: all)")
    exclude: str = _opt("", "exclusion list (an audit's exclude.csv: scene,row,col,size): those tiles of the first "
                        "dataset are not trained on (random windows centred in them are drawn again)")
    time_budget: float = _opt(0.0, "stop training after this many seconds, then validate and register (0: none)")
    validations: int = _opt(0, "under a time budget: validations spread over it (the last at its end); 0: one per "
                            f"{SECONDS_PER_VALIDATION:.0f} s of budget, at least {MIN_VALIDATIONS}; without a "
                            "budget every epoch is validated")
    device: str = _opt("auto", "auto, cpu or cuda")
    model_name: str = _opt("", "registered model name; empty: the task's default (rsseg-binary, ...)")
    register: bool = _opt(True, "register the best epoch as a new model version")
    checkpoint_dir: str = _opt("", "folder for resumable checkpoints; empty: runs/<run id>")
    resume: str = _opt("", "checkpoint file to resume from")
    overlays: int = _opt(4, "validation tiles drawn as prediction overlays")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.snapshots and self.scheduler != "cosine":
            raise ConfigError(f"snapshots=true restarts the cosine schedule itself; use scheduler=cosine, not "
                              f"{self.scheduler}")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ConfigError(f"distillation needs 0 <= alpha <= 1 and temperature > 0, got alpha={self.alpha}, "
                              f"temperature={self.temperature}")
        if self.snapshots and self.cycles < 2:
            raise ConfigError(f"snapshots=true needs cycles >= 2 (one snapshot per cycle), got {self.cycles}")
        if self.validations < 0:
            raise ConfigError(f"validations must be 0 (one per {SECONDS_PER_VALIDATION:.0f} s of budget) or more, "
                              f"got {self.validations}")
        if self.lr < 0:
            raise ConfigError(f"lr must be positive (or 0 for the task's default), got {self.lr}")


# Peak learning rates behind lr=0, measured at 10 CPU minutes (README "Quality per training minute"): 0.002
# trained roads and Dubai further than 0.001; on LEVIR-CD (4 training pairs) it overfitted sooner and scored
# 0.10-0.13 F1 lower in two runs, so change pairs keep 0.001.
DEFAULT_LR = 2e-3
DEFAULT_LR_BY_TASK = {"change": 1e-3}
# Augmentations behind augment=auto. Zoom and radiometric jitter keep LEVIR-CD's 4 training pairs from being
# learned by heart: F1 0.728 vs 0.543 at 1800 s (README "Quality per training minute"); on roads' 49
# images they did not help at 1800 s, so single-date tasks keep the seed's flips and rotations.
DEFAULT_AUGMENT = "hflip,rot90"
DEFAULT_AUGMENT_BY_TASK = {"change": "hflip,rot90,scale,jitter"}


def validations_under_budget(config: TrainConfig) -> int:
    """How many validations a time-budgeted run spreads over its budget."""
    if config.validations:
        return config.validations
    return max(MIN_VALIDATIONS, round(config.time_budget / SECONDS_PER_VALIDATION))


def with_task_defaults(config: TrainConfig, task: str) -> TrainConfig:
    """`config` with the defaults that depend on the dataset's task filled in (lr=0, augment=auto)."""
    return dataclasses.replace(
        config,
        lr=config.lr or DEFAULT_LR_BY_TASK.get(task, DEFAULT_LR),
        augment=DEFAULT_AUGMENT_BY_TASK.get(task, DEFAULT_AUGMENT) if config.augment == "auto" else config.augment,
    )


def parse_options(text: str) -> dict[str, Any]:
    """"a=1,b=x,c=true" -> {"a": 1, "b": "x", "c": True} (ints, floats, booleans, else strings).
    Commas inside brackets stay in the value: "decoder_channels=(64,32,16,8)" is one option."""
    options: dict[str, Any] = {}
    for item in (p.strip() for p in _split_top_level(text) if p.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"option {item!r} is not key=value (e.g. kernel_size=3)")
        options[key.strip()] = _scalar(value.strip())
    return options


def _split_top_level(text: str) -> list[str]:
    """Split on the commas that are not inside (), [] or {}."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _scalar(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One --flag per dataclass field, with its default, type, choices and help."""
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata.get("help", "")}
        if f.type in ("bool", bool):
            # `--overwrite` alone means true; `--overwrite false` (as MLproject passes it) works too.
            kwargs.update(type=_parse_bool, nargs="?", const=True)
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}.get(str(f.type), str)
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def from_args(config_cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def _parse_bool(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def split_list(value: str, cast: type = str) -> list[Any]:
    """Comma-separated CLI lists: 'a, b' -> ['a', 'b']; '' -> []."""
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"cannot read {value!r} as a comma-separated list of {cast.__name__}") from None


@dataclass
class MainConfig:
    """The README's end-to-end job: embedded defaults, brief training, registration."""

    source: str = _opt("", "dataset folder in one of the seeds' layouts; empty: the generated sea-ice dataset")
    epochs: int = _opt(3, "training epochs (brief, so the job finishes in minutes on a CPU)")
    encoder: str = _opt("", "timm encoder name; empty: train's default (efficientnet_lite0 for single-date data)")
    model_name: str = _opt("", "registered model name; empty: the task's default")
    repo: str = _opt("triton_repo", "Triton model repository the new version is promoted into")


@dataclass
class PrecisionOptions:
    """The precision a model is served (promote) or scored (evaluate) at (rsseg.export.quantize), and the
    runtime that computes it (rsseg.runtimes)."""

    precision: str = _opt("fp32", "fp32, int8 (static quantization, for CPUs) or fp16 (for GPU instances)",
                          ("fp32", "int8", "fp16"))
    runtime: str = _opt("onnxruntime", "what computes the model on CPU: onnxruntime, or openvino (faster on CPUs, "
                        "int8 above all: README)", ("onnxruntime", "openvino"))
    calibration_tiles: int = _opt(64, "int8: training tiles that calibrate the activation ranges")
    calibration_method: str = _opt("minmax", "int8: activation range calibration",
                                   ("minmax", "entropy", "percentile"))
    quantize_ops: str = _opt("", "int8: operator types quantized, e.g. Conv,MatMul (the rest stay fp32); empty: all "
                             "that ONNX Runtime can")
    quant_format: str = _opt("qdq", "int8 graph form: qdq (Quantize/DequantizeLinear pairs: both runtimes run it) or "
                             "qoperator (QLinearConv and friends: ONNX Runtime only)", ("qdq", "qoperator"))


@dataclass
class EvaluateConfig(PrecisionOptions):
    model: str = _opt("", "what to score: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID, or several joined "
                      "by commas (models:/NAME/3,5,7: their logit-averaging ensemble); with url, empty = what it serves")
    data: str = _opt("", "prepared dataset to score on; empty: the data the (first) model was trained on")
    split: str = _opt("val", "scenes to score", ("val", "train", "all"))
    url: str = _opt("", "score through this running Triton server (host:port, gRPC) instead of ONNX Runtime in "
                    "process")
    served_model: str = _opt("", "with url: the served ensemble's name; empty: the only one served")
    tta: str = _opt("none", "test-time augmentation (none, flips, d4), as the server applies it",
                    ("none", "flips", "d4"))
    margin: int = _opt(-1, "pixels dropped at inner window edges, as the scene client (-1: the client's default)")
    tile: int = _opt(0, "window size (0: the client's adaptive choice)")
    batch: int = _opt(4, "windows per request")
    tag: bool = _opt(True, "tag the evaluated registered version with eval_<metric> (single fp32 models only)")


@dataclass
class PseudoLabelConfig:
    teacher: str = _opt("", "the teacher: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID, or several joined by "
                        "commas (their logits averaged)")
    source: str = _opt("", "folder of unlabelled scenes (image files, or an images/ or image/ folder of them)")
    out: str = _opt("", "prepared dataset to write; empty: data/prepared/<source name>-pseudo (the masks go beside "
                    "it, in <out>-labels)")
    threshold: float = _opt(0.9, "keep a pixel's class where the teacher's probability reaches this; ignore elsewhere")
    tta: str = _opt("none", "test-time augmentation of the teacher (none, flips, d4)", ("none", "flips", "d4"))
    batch: int = _opt(4, "windows per teacher call")
    tile_size: int = _opt(0, "tile size of the prepared dataset (0: the teacher's training tile size)")
    overlap: int = _opt(-1, "overlap between neighbouring tiles in pixels (-1: as the teacher's training data)")


@dataclass
class AuditConfig:
    model: str = _opt("", "the model that audits: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID, or several "
                      "joined by commas (their logits averaged)")
    data: str = _opt("", "prepared dataset whose labels are audited; empty: the data the (first) model was trained on")
    split: str = _opt("train", "scenes to audit", ("train", "val", "all"))
    out: str = _opt("", "folder for tiles.csv, scenes.csv, exclude.csv and the figure; empty: audits/<dataset name>")
    exclude_share: float = _opt(0.05, "exclusion list: this share of the tiles, the worst-scoring first")
    exclude_below: float = _opt(-1.0, "exclusion list: every tile scoring below this instead (-1: use exclude_share)")
    figure_tiles: int = _opt(12, "worst tiles drawn in worst_tiles.png (image, label, prediction)")
    tta: str = _opt("none", "test-time augmentation (none, flips, d4)", ("none", "flips", "d4"))
    batch: int = _opt(4, "windows per model call")
    overwrite: bool = _opt(False, "replace an earlier audit at out")


@dataclass
class PromoteConfig(PrecisionOptions):
    model_name: str = _opt("rsseg-binary", "registered model whose versions compete")
    metric: str = _opt("", "version tag to compare on: val_<metric> (training validation) or eval_<metric> (`evaluate`, "
                       "served path); empty: each version's headline_metric")
    margin: float = _opt(0.0, "how much the candidate must beat the current champion by")
    min_value: float = _opt(-1.0, "refuse candidates whose metric is below this (-1: no minimum)")
    version: str = _opt("", "promote this version instead of the best one (still checked against the champion)")
    ensemble: str = _opt("", "promote the logit-averaging ensemble of these versions (e.g. 3,5,7): evaluated through the "
                         "served tiling against the champion, registered as a version of its own")
    ensemble_top: int = _opt(0, "promote the ensemble of the best K versions by the metric (0: no ensemble)")
    repo: str = _opt("triton_repo", "Triton model repository to write into")
    instance_kind: str = _opt("auto", "Triton instance kind for preprocess and segmenter", ("auto", "cpu", "gpu"))
    max_batch_size: int = _opt(8, "Triton max batch size of every model in the ensemble")
    intra_op_threads: int = _opt(0, "the served segmenter's runtime's intra-op threads (0: the runtime's default)")
    tta: str = _opt("none", "test-time augmentation served by default (none, flips, d4)", ("none", "flips", "d4"))
    opset: int = _opt(17, "ONNX opset (>= 17)")
    atol: float = _opt(1e-3, "largest ONNX Runtime vs PyTorch logit difference accepted")
    max_metric_drop: float = _opt(0.005, "int8/fp16: largest loss of the served validation metric against fp32")
    rollback: bool = _opt(False, "serve the previously promoted version again instead of promoting")
