"""insightface's verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...): read safely, write, evaluate.

Format (insightface, https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch,
`eval/verification.py`): a pickle of `(bins, issame_list)`. `bins` holds 2N encoded images (JPEG/PNG bytes; in
some files numpy uint8 arrays), pair i being images 2i and 2i+1; `issame_list` holds N booleans. The pairs are
in the order of the protocol's pairs file, and the protocol's ten folds are consecutive blocks of pairs.

A pickle can run any code while it loads, and these files are downloaded from third parties. They are read
with `SafeUnpickler`, which resolves only the few names the format needs (bytes, numpy arrays of numbers,
booleans or byte strings) and builds numpy arrays and dtypes itself from the validated pickle state, so
neither a named function nor a crafted dtype can do anything but build data. Anything else is an InputError
naming the file. Pickles written by Python 2 (most of the published files) are read with
`encoding="bytes"`, so their `str` images come back as bytes.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datasets.face_table import DECODE_ERRORS
from datasets.lfw_dataset import find_lfw_image, read_pairs
from errors import InputError, first_line
from eval_metrics import stratified_order
from fileio import atomic_write

NUM_FOLDS = 10  # insightface's KFold(n_splits=10, shuffle=False) over the pairs in file order
# protocol 4 is what Python >= 3.4 (and so every insightface loader in use) reads
PICKLE_PROTOCOL = 4
# numpy dtypes an image or label array may have: booleans, integers, floats, byte strings
_SAFE_DTYPE = re.compile(r"(?:b1|[iu][1248]|f[248]|S\d+)")


class VerificationBin(NamedTuple):
    """A .bin's content: `images[2 * i]` and `images[2 * i + 1]` are pair i; `issame[i]` says if they match."""

    images: list[bytes]
    issame: np.ndarray  # (num_pairs,) bool


def read_verification_bin(path) -> VerificationBin:
    """Load a .bin with the restricted unpickler and check its shape; any problem is an InputError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"verification file not found: {path}")
    with open(path, "rb") as f:
        content = safe_load(f, path)
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise InputError(f"{path}: expected a pickle of (images, issame), found {_describe(content)}")
    bins, issame_list = content
    if not isinstance(bins, (list, tuple)):
        raise InputError(f"{path}: the images must be a list, found {_describe(bins)}")
    if not bins and isinstance(issame_list, (list, tuple, np.ndarray)) and len(issame_list) == 0:
        raise InputError(f"{path}: the file holds no pairs")
    images = [_image_bytes(item, index, path) for index, item in enumerate(bins)]
    issame = _issame_array(issame_list, path)
    if len(images) != 2 * len(issame):
        raise InputError(
            f"{path}: {len(images)} images for {len(issame)} pairs (expected 2 images per pair, "
            f"{2 * len(issame)} in all)"
        )
    return VerificationBin(images, issame)


def _image_bytes(item, index: int, path: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    # cv2.imencode gives an (N, 1) array of the encoded bytes; a 2-D array with two sides > 1 is pixels
    if isinstance(item, np.ndarray) and item.ndim == 2 and 1 in item.shape:
        item = item.ravel()
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim > 1:
        raise InputError(
            f"{path}: image {index} is decoded pixels ({_describe(item)}), not the encoded image file bytes "
            "(JPEG, PNG) a .bin holds"
        )
    if isinstance(item, np.ndarray) and (item.dtype == np.uint8 or item.dtype.kind == "S"):
        return item.tobytes()
    raise InputError(f"{path}: image {index} is {_describe(item)}, not encoded image bytes")


def _issame_array(issame_list, path: str) -> np.ndarray:
    values = np.asarray(issame_list) if isinstance(issame_list, (list, tuple, np.ndarray)) else None
    if values is None or values.ndim != 1 or not (values.dtype == bool or values.dtype.kind in "iu"):
        raise InputError(f"{path}: issame must be a list of booleans, found {_describe(issame_list)}")
    if values.dtype != bool and not np.isin(values, (0, 1)).all():
        raise InputError(f"{path}: issame holds values other than 0/1 and True/False")
    return values.astype(bool)


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"a numpy array of {value.dtype} with shape {value.shape}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


class VerificationBinDataset(Dataset):
    """The 2N images of a .bin as `(transformed image, index)`, with what the LFW evaluation reads.

    Like `LFWDataset`: `pairs` ((N, 2) int64 rows into the dataset: [[0, 1], [2, 3], ...]), `issame` (N bools),
    `num_folds` (10) and `fold_of_pair` (the consecutive blocks insightface's ten folds are), so
    `verification.evaluate_model_on_lfw` runs on it unchanged. `name` is the file's stem (`lfw`, `cfp_fp`).
    Images are kept encoded in one numpy buffer (forked workers share it without copying) and decoded per item;
    one that does not decode is an InputError naming the file and image index, never replaced, since a
    substituted image would change the result silently.
    """

    def __init__(self, path, transform=None):
        self.path = os.fspath(path)
        self.name = os.path.splitext(os.path.basename(self.path))[0]
        self.transform = transform
        content = read_verification_bin(self.path)
        lengths = np.fromiter(
            (len(image) for image in content.images), dtype=np.int64, count=len(content.images)
        )
        self._starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._starts[1:])
        self._buffer = np.frombuffer(b"".join(content.images), dtype=np.uint8)
        num_pairs = len(content.issame)
        self.issame: np.ndarray = content.issame
        self.pairs = np.arange(2 * num_pairs, dtype=np.int64).reshape(num_pairs, 2)
        self.num_folds = max(1, min(NUM_FOLDS, num_pairs))
        blocks = np.array_split(np.arange(num_pairs), self.num_folds)
        self.fold_of_pair = np.repeat(np.arange(self.num_folds, dtype=np.int64), [len(b) for b in blocks])

    def __len__(self) -> int:
        return len(self._starts) - 1

    def image_bytes(self, index: int) -> bytes:
        return self._buffer[self._starts[index] : self._starts[index + 1]].tobytes()

    def __getitem__(self, index):
        try:
            with Image.open(io.BytesIO(self.image_bytes(index))) as encoded:
                image = encoded.convert("RGB")
        except DECODE_ERRORS as error:
            raise InputError(
                f"{self.path}: image {index} does not decode ({type(error).__name__}: {first_line(error)})"
            ) from None
        if self.transform is not None:
            image = self.transform(image)
        return image, index


class WriteSummary(NamedTuple):
    num_pairs: int
    num_images: int  # 2 * num_pairs: insightface stores both images of every pair, repeats included
    num_bytes: int
    note: str = ""  # how the pairs file's folds map to the .bin's ten blocks, when they are not its own


def write_verification_bin(lfw_dir, pairs_path, out_path) -> WriteSummary:
    """Write the pairs of an LFW-style pairs file as an insightface .bin (atomically), file bytes as they are.

    A .bin is read as ten consecutive blocks of pairs. Pairs keep the file's order when it has ten folds, so
    they stay the official ones; a file without folds (no header, or LFW View 1's one) or with another count
    of them is written in `stratified_order`, whose ten blocks each hold both kinds (for a file without
    folds, the folds a folder of it is evaluated in), and the summary's note says so. A missing image is an
    InputError.
    """
    lfw_dir, out_path = os.fspath(lfw_dir), os.fspath(out_path)
    if not os.path.isdir(lfw_dir):
        raise InputError(f"LFW image folder not found: {lfw_dir}")
    parsed = read_pairs(pairs_path)
    order, note = np.arange(len(parsed.issame)), ""
    if parsed.num_folds != NUM_FOLDS:
        # a .bin is read as ten consecutive blocks: in file order, another fold count would put one kind of
        # pair in a block (a 2-fold file of 30 same then 30 different pairs scored 29% accuracy)
        order = stratified_order(parsed.issame, NUM_FOLDS)
        has = (
            "no folds" if parsed.num_folds < 2 else f"{parsed.num_folds} folds, not the {NUM_FOLDS} of a .bin"
        )
        note = (
            f"{pairs_path} has {has}: its pairs are written as {NUM_FOLDS} folds of same and different pairs"
        )
    cache: dict[tuple[str, int], bytes] = {}
    images: list[bytes] = []
    for index in order:
        for key in (parsed.first[index], parsed.second[index]):
            if key not in cache:
                cache[key] = _lfw_image_bytes(lfw_dir, *key)
            images.append(cache[key])
    issame = [bool(parsed.issame[index]) for index in order]
    with atomic_write(out_path, "wb") as f:
        pickle.dump((images, issame), f, protocol=PICKLE_PROTOCOL)
    return WriteSummary(len(issame), len(images), os.path.getsize(out_path), note)


def _lfw_image_bytes(lfw_dir: str, name: str, number: int) -> bytes:
    path = find_lfw_image(lfw_dir, name, number)
    if path is None:
        raise InputError(
            f"LFW image missing: {os.path.join(lfw_dir, name, f'{name}_{number:04d}.jpg')} (also tried .png, .jpeg)"
        )
    with open(path, "rb") as f:
        data = f.read()
    try:  # refused here, not when the .bin is evaluated later
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except DECODE_ERRORS as error:
        raise InputError(f"{path}: does not decode as an image ({first_line(error)})") from None
    return data


# the restricted unpickler

# what a malformed (not malicious) pickle raises while it loads
_UNPICKLING_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    MemoryError,
)


def safe_load(file, path: str):
    """`pickle.load(file, encoding="bytes")` restricted to the .bin format's data types (see SafeUnpickler)."""
    try:
        loaded = SafeUnpickler(file, path).load()
    except InputError:
        raise
    except _UNPICKLING_ERRORS as error:
        raise InputError(
            f"{path}: not a readable verification pickle ({type(error).__name__}: {first_line(error)})"
        ) from None
    return _materialise(loaded, path)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names a verification .bin needs, each to a harmless stand-in.

    - `bytes()` / `bytearray(b)` / `_codecs.encode(text, "latin1")`: how protocols <= 2 spell byte strings.
    - numpy's `_reconstruct`, `ndarray`, `dtype`, `scalar` and `_frombuffer` (under `numpy.core` and
      `numpy._core`): arrays and scalars. They become `_ArrayState` / `_DtypeState` records that only store
      the pickle's arguments; `_materialise` then builds the arrays with `np.frombuffer` from a dtype in
      `_SAFE_DTYPE`, so object arrays, structured dtypes and numpy's own `__setstate__` are never reached.

    Any other name raises an InputError naming the file, before anything is called.
    """

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise InputError(
                f"{self.path}: refused to load: the pickle asks for {module}.{name}, which a verification .bin "
                f"does not contain (a tampered or different file)"
            )
        return allowed


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else value


class _DtypeState:
    """numpy.dtype(spec, align, copy) + its pickled state, kept as data."""

    def __init__(self, spec, align=False, copy=False):
        self.spec, self.state = _text(spec), None

    def __setstate__(self, state):
        self.state = state

    def resolve(self) -> np.dtype:
        spec = self.spec if isinstance(self.spec, str) else None
        state = self.state if isinstance(self.state, tuple) else (3, "|", None, None, None, -1, -1, 0)
        if (
            spec is None
            or not _SAFE_DTYPE.fullmatch(spec)
            or len(state) < 5
            or any(v is not None for v in state[2:5])
        ):
            raise ValueError(
                f"numpy dtype {self.spec!r} is not one of booleans, integers, floats or byte strings"
            )
        byte_order = _text(state[1])
        dtype = np.dtype(spec)
        return dtype.newbyteorder(byte_order) if byte_order in ("<", ">") else dtype


class _ArrayState:
    """numpy's `_reconstruct(ndarray, shape, typecode)` + the array's pickled state, kept as data."""

    def __init__(self, subtype=None, shape=None, typecode=None):
        if subtype is not _NDARRAY:
            raise ValueError("numpy _reconstruct of something else than an ndarray")
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def resolve(self) -> np.ndarray:
        if not isinstance(self.state, tuple) or len(self.state) != 5:
            raise ValueError("malformed numpy array state")
        _, shape, dtype, is_fortran, data = self.state
        if not isinstance(dtype, _DtypeState) or not isinstance(data, (bytes, bytearray)):
            raise ValueError("numpy array without a plain dtype and raw data (an object array?)")
        return _array_from_buffer(data, dtype.resolve(), shape, "F" if is_fortran else "C")


def _array_from_buffer(data, dtype: np.dtype, shape, order: str) -> np.ndarray:
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"malformed numpy array shape {shape!r}")
    count = int(np.prod(shape, dtype=object))
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"numpy array data of {len(data)} bytes for {count} values of {dtype}")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=_text(order)).copy()


def _scalar(dtype, data):
    if not isinstance(dtype, _DtypeState) or not isinstance(data, bytes):
        raise ValueError("malformed numpy scalar")
    return _array_from_buffer(data, dtype.resolve(), (), "C")[()]


def _frombuffer(data, dtype, shape, order):
    if not isinstance(dtype, _DtypeState) or not isinstance(data, (bytes, bytearray)):
        raise ValueError("malformed numpy array (protocol 5)")
    return _array_from_buffer(data, dtype.resolve(), shape, order)


def _bytes(*args):
    if args == ():
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise ValueError("bytes() with arguments other than a byte string")


def _bytearray(*args):
    return bytearray(_bytes(*args))


def _latin1_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or _text(encoding).lower() not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode other than of text to latin-1")
    return text.encode("latin1")


_NDARRAY = object()  # stands for numpy.ndarray, which the pickle may name but never call

_ALLOWED = {
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bytearray"): _bytearray,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeState,
}
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_module}.multiarray", "_reconstruct")] = _ArrayState
    _ALLOWED[(f"{_module}.multiarray", "scalar")] = _scalar
    _ALLOWED[(f"{_module}.numeric", "_frombuffer")] = _frombuffer


def _materialise(value, path: str, depth: int = 0):
    """Replace the array records in the loaded lists and tuples by real numpy arrays."""
    if depth > 3:
        return value
    try:
        if isinstance(value, _ArrayState):
            return value.resolve()
        if isinstance(value, _DtypeState):
            return value.resolve()
    except ValueError as error:
        raise InputError(f"{path}: refused to load: {first_line(error)}") from None
    if isinstance(value, list):
        return [_materialise(item, path, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_materialise(item, path, depth + 1) for item in value)
    return value
