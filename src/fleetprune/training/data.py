"""CIFAR-10 from one Parquet file of JPEGs, decoded once and augmented in batches on tensors.

The file (columns ``split``, ``label``, ``index``, ``jpeg``; class names in the schema metadata key
``classes``) is decoded once into a uint8 ``(N, 3, 32, 32)`` tensor per split. Augmentation (random
crop with 4 pixels of zero padding, horizontal flip) and normalisation then run on whole batches, so
a 2-core machine spends its time in the model, not in per-image PIL calls.

On a GPU the whole decoded dataset (150 MB of uint8 for CIFAR-10's 50,000 training images) fits on
the device: :meth:`ImageData.to` puts it there once, and :meth:`ImageData.device_batches` then draws
an epoch's random numbers on the host in one go (the same draws as the host path, so the batches are
identical), copies them over once, and indexes, crops, flips and normalises on the device, so no
image crosses the bus during training.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fleetprune.errors import DataError

log = logging.getLogger(__name__)

#: Per-channel mean and std of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
#: Environment variable that tests, benchmarks and the CLI read when no path is given.
CIFAR_ENV = "FLEETPRUNE_CIFAR"

_COLUMNS = ("split", "label", "index", "jpeg")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, rows: torch.Tensor | Sequence[int]) -> Split:
        """The rows ``rows`` as a new split (copies, so the parent can be freed)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Split(self.images[rows].contiguous(), self.labels[rows].contiguous())


@dataclass
class ImageData:
    """Decoded image splits plus what is needed to normalise them.

    Attributes:
        splits: split name (``train``, ``test``) to :class:`Split`.
        classes: class names, index = label.
        mean, std: per-channel normalisation constants for pixel values in [0, 1].
    """

    splits: dict[str, Split]
    classes: tuple[str, ...] = CIFAR10_CLASSES
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    source: str = ""
    _norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        """The split called ``name``; an unknown name raises :class:`DataError`."""
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(
                f"no split {name!r} in {self.source or 'the data'}; it has {sorted(self.splits)}"
            ) from None

    def subset(self, train: int | None = None, test: int | None = None, *, seed: int | None = 0
               ) -> ImageData:
        """A smaller copy for quick runs: ``train``/``test`` images of those splits.

        ``seed`` draws a seeded uniform sample; ``seed=None`` takes the first rows in file order
        (the CIFAR file is sorted by class, so the first rows are all airplanes).
        """
        splits = dict(self.splits)
        for name, n in (("train", train), ("test", test)):
            if n is not None and name in splits:
                splits[name] = splits[name].take(_pick_rows(len(splits[name]), n, seed))
        return ImageData(splits, self.classes, self.mean, self.std, self.source)

    def num_batches(self, split: str, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields for these arguments."""
        n = len(self.split(split))
        if drop_last and n >= batch_size:
            return n // batch_size
        return -(-n // batch_size)

    @property
    def device(self) -> torch.device:
        """Where the decoded images live (the CPU unless :meth:`to` moved them)."""
        for sp in self.splits.values():
            return sp.images.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> ImageData:
        """A copy whose uint8 images and labels live on ``device`` (for :meth:`device_batches`).

        Decoding stays on the host; this is one copy per split. Returns ``self`` if already there.
        """
        device = torch.device(device)
        if all(_same_device(sp.images.device, device) for sp in self.splits.values()):
            return self
        splits = {name: Split(sp.images.to(device), sp.labels.to(device))
                  for name, sp in self.splits.items()}
        log.info("moved %s to %s", ", ".join(f"{k} {len(v)}" for k, v in splits.items()), device)
        return ImageData(splits, self.classes, self.mean, self.std, self.source)

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)``: float ``(B, C, H, W)`` normalised, int64 ``(B,)``.

        Order and augmentation depend only on ``(seed, epoch)``, so a resumed run sees the same
        batches as an uninterrupted one. ``drop_last`` drops a short final batch (never the only
        one), which keeps batch norm away from batches of one image. Data that :meth:`to` put on
        an accelerator is served by :meth:`device_batches` (same batches, drawn there).
        """
        if self.device.type != "cpu":
            if device is not None and not _same_device(torch.device(device), self.device):
                raise DataError(f"the images are on {self.device}, batches were asked for on "
                                f"{device}; call data.to({str(device)!r}) first")
            yield from self.device_batches(split, batch_size, augment=augment, shuffle=shuffle,
                                           seed=seed, epoch=epoch, drop_last=drop_last)
            return
        data = self.split(split)
        n = len(data)
        if n == 0:
            raise DataError(f"split {split!r} of {self.source or 'the data'} is empty")
        device = torch.device(device) if device is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(_mix(seed, epoch))
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        count = self.num_batches(split, batch_size, drop_last=drop_last)
        for b in range(count):
            rows = order[b * batch_size:(b + 1) * batch_size]
            x = data.images[rows].to(device, non_blocking=True)
            y = data.labels[rows].to(device, non_blocking=True)
            if augment:
                x = augment_batch(x, gen)
            yield self.normalize(x), y

    def device_batches(
        self,
        split: str,
        batch_size: int,
        *,
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of :meth:`batches`, built where the images live (see :meth:`to`).

        The order and every crop offset and flip of the epoch are drawn up front from the same
        host generator, in the same order as :meth:`batches` draws them, so for equal arguments
        the batches are equal wherever the images are. They travel to the device in one copy;
        indexing, padding, cropping, flipping and normalising then run there without a host
        round trip per batch. ``channels_last`` returns NHWC-strided batches.
        """
        data = self.split(split)
        n = len(data)
        if n == 0:
            raise DataError(f"split {split!r} of {self.source or 'the data'} is empty")
        dev = data.images.device
        gen = torch.Generator().manual_seed(_mix(seed, epoch))
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        count = self.num_batches(split, batch_size, drop_last=drop_last)
        sizes = [min(batch_size, n - b * batch_size) for b in range(count)]
        # One host tensor, one copy: order, then per image (crop y, crop x, flip).
        host = [order[:sum(sizes)].view(-1, 1)]
        if augment:
            draws = [torch.cat(_draw_augment(s, gen), dim=1) for s in sizes]
            host.append(torch.cat(draws))
        table = torch.cat(host, dim=1).to(dev, non_blocking=True)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        start = 0
        for s in sizes:
            part = table[start:start + s]
            start += s
            rows = part[:, 0]
            x, y = data.images[rows], data.labels[rows]
            if augment:
                x = _apply_augment(x, part[:, 1:2], part[:, 2:3], part[:, 3:4].bool())
            yield self.normalize(x).contiguous(memory_format=fmt), y

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images to float, scaled to [0, 1] and normalised per channel."""
        dev = images.device
        if dev not in self._norm:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
            self._norm[dev] = (1.0 / (255.0 * std), mean / std)
        scale, shift = self._norm[dev]
        return images.float().mul_(scale).sub_(shift)


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 4,
                  flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip of a uint8 batch.

    Same distribution as torchvision's ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip``,
    done for the whole batch with two gathers. The flip is folded into the column index.
    """
    oy, ox, flipped = _draw_augment(images.shape[0], generator, pad, flip)
    dev = images.device
    return _apply_augment(images, oy.to(dev), ox.to(dev), flipped.to(dev) if flip else None, pad)


def _draw_augment(b: int, generator: torch.Generator, pad: int = 4, flip: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random numbers of one :func:`augment_batch` call, in its order: ``(B, 1)`` each."""
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    if flip:
        flipped = torch.rand(b, 1, generator=generator) < 0.5
    else:
        flipped = torch.zeros(b, 1, dtype=torch.bool)
    return oy, ox, flipped.long()


def _apply_augment(images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                   flipped: torch.Tensor | None, pad: int = 4) -> torch.Tensor:
    """Crop at offsets ``(oy, ox)`` of the zero-padded batch, mirrored where ``flipped``.

    All index tensors must be on the images' device; nothing here synchronises with the host.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = oy + torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flipped is not None:
        cols = torch.where(flipped.bool(), (w - 1) - cols, cols)
    cols = ox + cols
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when the current one is 0.
    if a.type != b.type:
        return False
    if a.type == "cuda":
        cur = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return a.index == b.index or a.index is None or b.index is None


def load_cifar10(
    path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    train: int | None = None,
    test: int | None = None,
    seed: int | None = 0,
) -> ImageData:
    """Read and decode the CIFAR-10 Parquet file.

    Args:
        path: the ``cifar10-jpeg.parquet`` file.
        cache_dir: optional folder for a decoded ``.npz`` copy keyed by the file's path, size and
            modification time; a second load then skips decoding.
        train, test: keep only this many images of that split (see :meth:`ImageData.subset`).
            Without a cache only those rows are decoded.
        seed: sampling seed for ``train``/``test``; ``None`` takes the first rows.

    Raises:
        DataError: the file is absent, not Parquet, lacks a column, or holds a bad image or label.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"CIFAR-10 file not found: {path}. Pass --data PATH (or set {CIFAR_ENV}) pointing to "
            "cifar10-jpeg.parquet, e.g. ../shared/data/cifar10-jpeg.parquet"
        )
    subset = {"train": train, "test": test}
    if cache_dir is not None:
        data = _load_cached(path, Path(cache_dir))
        return data.subset(train, test, seed=seed)
    return _read_parquet(path, subset, seed)


def default_cifar_path(repo_root: str | os.PathLike[str] | None = None) -> Path:
    """``$FLEETPRUNE_CIFAR`` or ``<repo_root>/../shared/data/cifar10-jpeg.parquet``."""
    env = os.environ.get(CIFAR_ENV)
    if env:
        return Path(env)
    root = Path(repo_root) if repo_root is not None else Path.cwd()
    return root.parent / "shared" / "data" / "cifar10-jpeg.parquet"


def _pick_rows(n: int, k: int, seed: int | None) -> torch.Tensor:
    if k < 0:
        raise DataError(f"subset size must be >= 0, got {k}")
    k = min(k, n)
    if seed is None:
        return torch.arange(k)
    # Sorted so a subset keeps file order; the loader shuffles anyway.
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    return rows.sort().values


def _mix(seed: int, epoch: int) -> int:
    # Distinct, stable generator seeds per (seed, epoch) without collisions between neighbours.
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1)


def _read_parquet(path: Path, subset: dict[str, int | None], seed: int | None) -> ImageData:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path} is not a readable Parquet file ({exc}); re-copy cifar10-jpeg.parquet"
        ) from None
    missing = [c for c in _COLUMNS if c not in schema.names]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {missing}; expected {list(_COLUMNS)} "
            "(is this the CIFAR-10 JPEG Parquet file?)"
        )
    meta = schema.metadata or {}
    classes = tuple(meta.get(b"classes", b"").decode().split(",")) if b"classes" in meta else ()
    try:
        table = pq.read_table(path, columns=list(_COLUMNS))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path} ({exc}); re-copy cifar10-jpeg.parquet") from None

    split_col = np.asarray(table.column("split").to_numpy(zero_copy_only=False)).astype(str)
    labels_all = table.column("label").to_numpy(zero_copy_only=False)
    index_all = table.column("index").to_numpy(zero_copy_only=False)
    if not classes:
        classes = CIFAR10_CLASSES if labels_all.max(initial=0) < 10 else tuple(
            str(i) for i in range(int(labels_all.max()) + 1))
    if labels_all.min(initial=0) < 0 or labels_all.max(initial=0) >= len(classes):
        raise DataError(
            f"{path} has labels outside 0..{len(classes) - 1}; the file is malformed, re-copy it"
        )
    blob, offsets = _binary_column(table.column("jpeg"))

    splits: dict[str, Split] = {}
    for name in sorted(set(split_col.tolist())):
        rows = np.flatnonzero(split_col == name)
        k = subset.get(name)
        if k is not None:
            rows = rows[_pick_rows(len(rows), k, seed).numpy()]
        images = _decode(blob, offsets, rows, path, name, index_all)
        labels = torch.from_numpy(labels_all[rows].astype(np.int64))
        splits[name] = Split(images, labels)
    for need in ("train", "test"):
        if need not in splits:
            raise DataError(f"{path} has no {need!r} rows (splits: {sorted(splits)}); re-copy it")
    log.info("loaded %s: %s", path,
             ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return ImageData(splits, classes, source=str(path))


def _binary_column(column) -> tuple[torch.Tensor, np.ndarray]:
    """All JPEG bytes as one writable uint8 tensor plus row offsets (no per-row Python bytes)."""
    import pyarrow as pa

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks)
    wide = pa.types.is_large_binary(arr.type)
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64 if wide else np.int32)
    offsets = offsets[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    blob = torch.from_numpy(np.frombuffer(data_buf, dtype=np.uint8).copy())
    return blob, offsets


def _decode(blob: torch.Tensor, offsets: np.ndarray, rows: np.ndarray, path: Path, split: str,
            index_all: np.ndarray) -> torch.Tensor:
    """Decode ``rows`` to uint8 ``(N, 3, 32, 32)``.

    torchvision's batched libjpeg-turbo decoder is used when present (about 3.5x faster than a
    Pillow loop here, and bit-identical on this file); Pillow is the fallback and also pinpoints
    the row of a broken image.
    """
    out = torch.empty((len(rows), 3, 32, 32), dtype=torch.uint8)
    chunks = [blob[offsets[r]:offsets[r + 1]] for r in rows]
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # noqa: BLE001 - torchvision missing or built for another torch
        decode_jpeg = None
    step = 4096
    for start in range(0, len(rows), step):
        part = chunks[start:start + step]
        decoded = None
        if decode_jpeg is not None:
            try:
                with warnings.catch_warnings():
                    # torchvision 0.29 says its decoders move to torchcodec; Pillow is the fallback.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = decode_jpeg(part, mode=ImageReadMode.RGB)
            except RuntimeError:
                decoded = None  # let Pillow find and name the bad row
        if decoded is None:
            decoded = [_decode_pil(c, path, split, int(index_all[rows[start + i]]))
                       for i, c in enumerate(part)]
        for i, img in enumerate(decoded):
            if img.shape != (3, 32, 32):
                raise DataError(
                    f"{path}: {split} image {int(index_all[rows[start + i]])} is "
                    f"{tuple(img.shape)}, expected (3, 32, 32); re-copy the file"
                )
            out[start + i] = img
    return out


def _decode_pil(chunk: torch.Tensor, path: Path, split: str, index: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(chunk.numpy().tobytes())) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bad bytes
        raise DataError(
            f"{path}: {split} image {index} is not a decodable JPEG ({exc}); re-copy the file"
        ) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _cache_file(path: Path, cache_dir: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir / f"{path.stem}-{digest}.npz"


def _load_cached(path: Path, cache_dir: Path) -> ImageData:
    cache = _cache_file(path, cache_dir)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                names = [str(s) for s in z["splits"]]
                splits = {
                    s: Split(torch.from_numpy(z[f"{s}_images"]), torch.from_numpy(z[f"{s}_labels"]))
                    for s in names
                }
                classes = tuple(str(c) for c in z["classes"])
            log.info("loaded decoded CIFAR-10 from cache %s", cache)
            return ImageData(splits, classes, source=str(path))
        except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
            log.warning("ignoring unreadable cache %s (%s); decoding again", cache, exc)
    data = _read_parquet(path, {}, None)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        arrays = {"splits": np.array(list(data.splits)), "classes": np.array(data.classes)}
        for s, sp in data.splits.items():
            arrays[f"{s}_images"] = sp.images.numpy()
            arrays[f"{s}_labels"] = sp.labels.numpy()
        tmp = cache_dir / f".{cache.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, cache)  # atomic: a reader sees the whole cache or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("wrote decoded CIFAR-10 cache %s", cache)
    except OSError as exc:
        log.warning("could not write cache %s (%s); continuing without it", cache, exc)
    return data
