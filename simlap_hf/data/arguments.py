"""Command-line arguments of the data pipeline and the split names every source ends with."""

import os
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_CROP_PCT",
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_INTERPOLATION",
    "SAMPLERS",
    "TRAIN_SPLIT",
    "VALIDATION_SPLIT",
    "DataArguments",
]

TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"
SAMPLERS = ("random", "pk")
# Preprocessing defaults, shared with everything that describes a model's preprocessing without the run's arguments
# (the timm export of a folder saved without an image processor, say).
DEFAULT_INPUT_SIZE = 32
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bicubic"


@dataclass
class DataArguments:
    """Arguments that describe the data and its augmentation (parsable by ``transformers.HfArgumentParser``).

    Note: ``dataloader_num_workers`` has the same name as a ``transformers.TrainingArguments`` field, so
    parse this class with its own parser (or drop one of them) when combining it with ``TrainingArguments``.
    """

    dataset_name: str | None = field(
        default="digits",
        metadata={
            "help": "Named data set (cifar10, cifar100, fashion_mnist, digits), a Hub data set id ('org/name'), "
            "or a local path: a save_to_disk folder, a parquet file or folder, or a folder of MNIST IDX files."
        },
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "Hub config name; for cifar100, 'coarse' or 'fine' selects the label column."},
    )
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Imagefolder tree (train_dir/<class>/<image>) for training; wins over dataset_name."},
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Imagefolder tree for validation (used with --train_dir)."}
    )
    image_column_name: str | None = field(
        default=None,
        metadata={"help": "Image column of the source; default: per named data set, else the single Image column."},
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Label column of the source; default: per named data set, else 'label'/'labels'."},
    )
    train_val_split: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of train carved (seeded, stratified when possible) into validation when the "
            "source has no validation/test split."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training images after a seeded shuffle."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation images after a seeded shuffle."}
    )
    input_size: int = field(
        default=DEFAULT_INPUT_SIZE, metadata={"help": "Side of the square network input in pixels."}
    )
    scale: list[float] = field(
        default_factory=lambda: [0.7, 1.0], metadata={"help": "RandomResizedCrop area scale range (min max)."}
    )
    ratio: list[float] = field(
        default_factory=lambda: [0.75, 1.3333333333333333],
        metadata={"help": "RandomResizedCrop aspect ratio range (min max)."},
    )
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    aa: str | None = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm RandAugment / AutoAugment policy string; None or 'none' disables it."},
    )
    color_jitter: float | None = field(
        default=None,
        metadata={
            "help": "Color jitter strength, only used by timm when --aa is disabled; None (default) disables it "
            "(timm's own default would be 0.4)."
        },
    )
    reprob: float = field(default=0.1, metadata={"help": "RandomErasing probability."})
    interpolation: str = field(
        default=DEFAULT_INTERPOLATION, metadata={"help": "Resize interpolation (bicubic, bilinear, ...)."}
    )
    crop_pct: float = field(
        default=DEFAULT_CROP_PCT,
        metadata={"help": "Eval: resize to input_size / crop_pct, then center crop input_size (32 -> 36 -> 32)."},
    )
    mean: list[float] | None = field(
        default=None, metadata={"help": "Normalisation mean (1 or 3 values); default: per data set."}
    )
    std: list[float] | None = field(
        default=None, metadata={"help": "Normalisation std (1 or 3 values); default: per data set."}
    )
    ra: int = field(default=3, metadata={"help": "Repeated augmentation: copies of each image per epoch (1 disables)."})
    sampler: str = field(
        default="random",
        metadata={
            "help": "Training batches: 'random' (images in random order) or 'pk' (P classes x K images each, "
            "--pk_images_per_class; many partners per class for arbitrary pairs when classes are many)."
        },
    )
    pk_images_per_class: int = field(default=4, metadata={"help": "K of --sampler pk: images of each class per batch."})
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes (persistent). Unset: 0 without a GPU (exact mid-epoch resume, see "
            "the README's Guarantees); with a GPU, the CPU cores per local process minus one, at most 8."
        },
    )
    uint8_transfer: bool = field(
        default=True,
        metadata={
            "help": "Training samples leave the loader as uint8 (4x less to copy to the device) and are "
            "normalised on the device; --no_uint8_transfer normalises in the loader (float32)."
        },
    )
    skip_corrupt_images: bool = field(
        default=False,
        metadata={
            "help": "Skip images that cannot be decoded instead of raising an error that names the file. Image "
            "folders and splits of at most 10,000 images are decoded when loaded and such images dropped (how many "
            "and which is logged); in larger ones, not decoded before training, an unreadable image is replaced in its "
            "batch by another image of that batch, with that image's label, and named in a warning."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Train from a stream (datasets' IterableDataset): local tar shards (--train_files), an image "
            "folder (--train_dir) or a Hub data set, read in order without random access and without loading it "
            "first; images shuffled in a seeded buffer (--shuffle_buffer_size), each decoded once and augmented --ra "
            "times in one batch; every process and loader worker reads its own shards. Validation is loaded into "
            "memory from --validation_files, --validation_dir or the source's validation/test split."
        },
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --streaming: WebDataset-style tar shards (key.png/.jpg with key.cls or key.json "
            "{'label': n}), as paths, globs or brace ranges, e.g. 'shards/train-{0000..0003}.tar'."
        },
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "With --streaming: tar shards of the validation split (as --train_files)."}
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "With --streaming: images in the seeded shuffle buffer (reshuffled every epoch)."},
    )
    streaming_num_examples: int | None = field(
        default=None,
        metadata={
            "help": "With --streaming: training images in the stream (sets the epoch length and the schedule); "
            "needed when the source does not say it (local shards and folders)."
        },
    )
    streaming_train_eval_examples: int = field(
        default=1000,
        metadata={"help": "With --streaming: training images (the stream's first) kept in memory for kNN evaluation."},
    )

    def loader_workers(self) -> int:
        """Worker processes of the loaders: ``--dataloader_num_workers``, or when unset 0 without a GPU and, with
        one, the CPU cores per process on this machine minus one (for the training process), at most 8."""
        if self.dataloader_num_workers is not None:
            return self.dataloader_num_workers
        import torch

        if not torch.cuda.is_available():
            return 0
        processes_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return max(1, min(8, (os.cpu_count() or 1) // processes_here - 1))

    def __post_init__(self) -> None:
        """Check value ranges early, with messages that name the flag and the bad value."""
        if not 0.0 <= self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in [0, 1), got {self.train_val_split}.")
        for flag in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            if value is not None and value <= 0:
                raise ValueError(f"--{flag} must be a positive integer or None, got {value}.")
        if self.input_size <= 0:
            raise ValueError(f"--input_size must be positive, got {self.input_size}.")
        for flag in ("scale", "ratio"):
            value = getattr(self, flag)
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"--{flag} needs two increasing positive numbers (min max), got {value}.")
        for flag in ("hflip", "reprob"):
            value = getattr(self, flag)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{flag} is a probability and must be in [0, 1], got {value}.")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"--crop_pct must be in (0, 1], got {self.crop_pct}.")
        if self.ra < 1:
            raise ValueError(f"--ra (repeated augmentation count) must be >= 1, got {self.ra}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler={self.sampler!r} is not valid; choose one of {', '.join(SAMPLERS)}.")
        if self.pk_images_per_class < 1:
            raise ValueError(f"--pk_images_per_class must be >= 1, got {self.pk_images_per_class}.")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}.")
        for flag in ("mean", "std"):
            value = getattr(self, flag)
            if value is not None and len(value) not in (1, 3):
                raise ValueError(f"--{flag} needs 1 or 3 values, got {len(value)}: {value}.")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"--std values must be positive, got {self.std}.")
        self._check_streaming()

    def _check_streaming(self) -> None:
        """The streaming flags: only with --streaming, positive sizes, and no sampler that needs random access."""
        if not self.streaming:
            for flag in ("train_files", "validation_files", "streaming_num_examples"):
                if getattr(self, flag) is not None:
                    raise ValueError(f"--{flag} is read only with --streaming; add --streaming or drop it.")
            return
        for flag in ("shuffle_buffer_size", "streaming_num_examples", "streaming_train_eval_examples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be a positive integer, got {value}.")
        if self.max_train_samples is not None:
            raise ValueError("--max_train_samples needs random access; with --streaming use --streaming_num_examples.")
        if self.sampler != "random":
            raise ValueError(f"--sampler {self.sampler} needs random access to the images; not with --streaming.")
