"""A webdataset sample as mmtrain reads it: shard files, members, labels, checks.

Each sample of a shard is a group of files with one key: an image (`jpg`, `jpeg`, `png` or
`webp`), a caption (`txt`), and optionally a label: a `cls` file or a field of its `json`
(`data.label_key`). Both are raw labels under the one rule of `mmtrain.data.labels` (a
`cls` file's text is not turned into a number here), with one convention of open_clip's:
when `classes.txt` lies beside the shards, it names the classes in id order and a `cls`
file holds a class id (its line in classes.txt), while a json label holds a class name
(as `mmtrain shards` writes it). `SampleChecker` turns a raw sample into (image, text,
class id) or a bad-sample reason; `scan` reads the small members of every sample once.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import shlex
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from mmtrain.data.images import ImageProblem, load_image
from mmtrain.data.labels import Classes, resolve_label
from mmtrain.errors import UserError, read_text

log = logging.getLogger("mmtrain")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CLASSES_FILE = "classes.txt"  # beside the shards: one class name per line, in id order
SIZES_FILE = "sizes.json"  # beside the shards: {shard file name: samples} (open_clip's)
IMAGE = "__image__"  # in a scanned sample: it has an image member
INSTALL = "pip install 'mmtrain[webdataset]'"
STALL_SECONDS = 60  # an http(s) shard's server that sends nothing this long has failed


def require_webdataset() -> Any:
    """The `webdataset` module, or a UserError with the install command."""
    try:
        import webdataset
    except ImportError:
        raise UserError(f"data=webdataset needs the webdataset library: {INSTALL}") from None
    return webdataset


def is_url(shard: str) -> bool:
    """True for a shard named by a URL that webdataset opens (`pipe:CMD`, `http(s)://`,
    `gs://` ...), False for a local path (or a `file:` URL)."""
    return urlparse(shard).scheme not in ("", "file")


def expand_shards(spec: str | list[str], key: str) -> list[str]:
    """The shards of a brace pattern (or a list of patterns) as webdataset expands them
    (braces, `::` between sets): local paths made absolute, each of which must exist, and
    URLs kept as written."""
    from webdataset.gopen import gopen_schemes
    from webdataset.shardlists import expand_urls

    patterns = [spec] if isinstance(spec, str) else list(spec)
    names = [name for pattern in patterns for name in expand_urls(str(pattern))]
    unknown = [n for n in names if is_url(n) and urlparse(n).scheme not in gopen_schemes]
    if unknown:
        raise UserError(
            f"data.{key}: webdataset opens no {urlparse(unknown[0]).scheme}:// URL "
            f"({unknown[0]}). Name a command that writes the shard to its output instead, "
            "e.g. 'pipe:aws s3 cp s3://bucket/shard-{000..999}.tar -'."
        )
    local = [Path(urlparse(n).path if n.startswith("file:") else n).expanduser() for n in names]
    missing = [
        str(p) for n, p in zip(names, local, strict=True) if not is_url(n) and not p.is_file()
    ]
    if not names or missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(
            f"data.{key}={spec}: "
            + (
                f"{len(missing)} shard file(s) do not exist ({shown})"
                if missing
                else "names no shard"
            )
            + ". Give a brace pattern such as data/{00000..00099}.tar, a list of .tar files, or "
            "URLs (pipe:COMMAND, https://...)."
        )
    return [n if is_url(n) else str(p.resolve()) for n, p in zip(names, local, strict=True)]


def read_classes_file(folder: Path) -> list[str] | None:
    """The class names (id order) of the classes.txt in `folder`, or None when it has none.

    One name per line, exactly as written but for the line end (a label's string form is
    its class name, spaces included, as in a manifest); blank lines are skipped."""
    path = folder / CLASSES_FILE
    if not path.is_file():
        return None
    lines = read_text(path, "The class names beside the shards").split("\n")
    return [name.removesuffix("\r") for name in lines if name.strip()]


class SampleChecker:
    """Turns one raw sample (a dict of bytes) into (image, text, label) or a problem.

    `classes` resolve every label; `cls_ids` (classes.txt beside the shards) reads a `cls`
    file as a class id into them, whatever the other labels are."""

    def __init__(
        self,
        classes: Classes,
        label_key: str | None,
        size: int,
        max_pixels: int,
        cls_ids: bool = False,
    ):
        self.classes, self.label_key = classes, label_key
        self.cls_classes = Classes(classes.names, ids=True) if cls_ids else classes
        self.class_names = classes.names
        self.size, self.max_pixels = size, max_pixels

    def label(self, sample: dict[str, Any]) -> tuple[int | None, tuple[str, str] | None]:
        """(class id, None) or (None, (reason, detail)) of a sample's label."""
        if self.label_key is None:
            return 0, None
        member, value = raw_label(sample, self.label_key)
        if member is None:
            return None, ("missing label", f"no cls file and no {self.label_key!r} field in json")
        return resolve_label(value, self.cls_classes if member == "cls" else self.classes)

    def __call__(
        self, sample: dict[str, Any], decode: bool = True
    ) -> tuple[Any, tuple[str, str] | None]:
        """((image or None, text, label), None) or (None, (reason, detail))."""
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            return None, ("missing image", f"{name} has no {'/'.join(IMAGE_KEYS)} file")
        text = sample.get("txt")
        if text is None:
            return None, ("missing text", f"{name} has no txt file")
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        if not text.strip():
            return None, ("empty text", f"{name}: the text is empty")
        label, problem = self.label(sample)
        if problem is not None:
            return None, (problem[0], f"{name}: {problem[1]}")
        image = None
        if decode:
            try:
                data = io.BytesIO(sample[image_key])
                pixels = load_image(data, self.size, self.max_pixels, f"{name}.{image_key}")
            except ImageProblem as error:
                return None, (error.reason, error.detail)
            image = torch.from_numpy(pixels.copy())
        return (image, text, label), None


def raw_label(sample: dict[str, Any], label_key: str) -> tuple[str | None, Any]:
    """(member, label as stored): ("cls", the cls file's text), else ("json", the json
    field), else (None, None) when the sample has neither."""
    if "cls" in sample:
        data = sample["cls"]
        return "cls", data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (ValueError, TypeError):
            return None, None
        if isinstance(record, dict) and label_key in record:
            return "json", record[label_key]
    return None, None


def member_name(name: str) -> str:
    """A shard member's name as mmtrain groups it: `./KEY.jpg` (what `tar -C DIR -cf X.tar .`
    writes) is `KEY.jpg`, so its samples keep their keys."""
    return posixpath.normpath(name)


class ShardUnreachable(UserError):
    """A remote shard that could not be read after data.retries tries. Mid-run the run
    stops with exit code 1 (its checkpoints are whole) and this message."""

    exit_code = 1


def shard_samples(shards: Iterable[str], handler: Any, retries: int = 0) -> Iterator[dict]:
    """The raw samples of `shards` as webdataset groups a shard's members (member names
    through `member_name`), each with its place in its shard (`__place__`); `handler(error)` gets each damaged shard and goes on (True).
    A remote shard whose transfer fails is read again, `retries` times at most, from its
    start (skipping the samples already given), then `ShardUnreachable` names it."""
    for shard in shards:
        yield from _shard(shard, handler, retries)


def _shard(url: str, handler: Any, retries: int) -> Iterator[dict]:
    from webdataset import tariterators

    given, failures = 0, 0
    while True:
        streams: list[Any] = []
        opened = _kept(tariterators.url_opener([{"url": _opened_as(url)}]), streams)
        files = tariterators.tar_file_expander(opened, rename_files=member_name)
        try:
            for place, sample in enumerate(tariterators.group_by_keys(files, handler=handler)):
                if place >= given:
                    given += 1
                    sample["__place__"] = place  # its place in its shard
                    sample["__url__"] = url
                    yield sample
            _close(streams)  # a command that failed after its last byte raises here
            return
        except Exception as error:  # noqa: BLE001 - a transfer's or a tar reader's
            failed = _transfer_failed(streams, error) if is_url(url) else None
            if failed is None:
                handler(error)  # a damaged shard: the handler raises or goes on
                return
            failures += 1
            if failures > retries:
                raise ShardUnreachable(
                    f"cannot read the shard {url} after {failures} tries ({failed}); check "
                    "the URL or command, the server and its credentials (data.retries sets "
                    "the tries)."
                ) from None
            log.warning("reading %s failed (%s); try %d of %d", url, failed, failures + 1,
                        retries + 1)  # fmt: skip
            time.sleep(min(2.0 ** (failures - 1), 30.0))
        finally:
            _close(streams, quietly=True)


def _opened_as(url: str) -> str:
    """The URL webdataset opens for `url`: an http(s) shard through curl as webdataset's
    gopen reads it, but failing when the server sends nothing for STALL_SECONDS (instead of
    waiting for ever) and without curl's own retries (data.retries counts the tries)."""
    if urlparse(url).scheme not in ("http", "https"):
        return url
    return (
        f"pipe:curl -f -s -L --connect-timeout {STALL_SECONDS} --speed-limit 1 "
        f"--speed-time {STALL_SECONDS} {shlex.quote(url)}"
    )


def _kept(sources: Iterable[dict], streams: list[Any]) -> Iterator[dict]:
    """`sources` (opened shards), each stream kept in `streams` too."""
    for source in sources:
        streams.append(source["stream"])
        yield source


def _transfer_failed(streams: list[Any], error: Exception) -> str | None:
    """Why the shard's transfer failed (it could not be opened, or its command or curl
    exited with an error), or None when its bytes arrived and the tar in them is damaged."""
    from webdataset.gopen import Pipe

    if not streams:
        return f"it could not be opened: {error.args[0] if error.args else error!r}"
    stream = streams[0]
    if not isinstance(stream, Pipe):
        return None
    try:
        status = stream.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # still sending: the bytes so far are damaged
        stream.proc.kill()
        return None
    if status in stream.ignore_status:
        return None
    command = stream.args[0][0]
    name = command[0] if isinstance(command, list) else command.split()[0]
    return f"{name} exited with status {status}"


def _close(streams: list[Any], quietly: bool = False) -> None:
    for stream in streams:
        try:
            stream.close()
        except Exception:
            if not quietly:
                raise


def _small_members(shard: str, retries: int) -> tuple[list[dict[str, bytes]], str | None]:
    """The small members (txt, cls, json) of each sample of `shard`, grouped as
    `shard_samples` groups them, and the error that ended reading a damaged shard (the
    samples before it are kept). A local shard's images are skipped, not read; a remote
    one is read whole, once."""
    from webdataset.tariterators import base_plus_ext

    if is_url(shard):
        errors: list[str] = []
        found = [
            {k: v for k, v in sample.items() if k in ("txt", "cls", "json")}
            | ({IMAGE: b""} if any(k in sample for k in IMAGE_KEYS) else {})
            for sample in _shard(shard, lambda error: errors.append(str(error)) or True, retries)
        ]
        return found, (errors[0] if errors else None)

    samples: list[dict[str, bytes]] = []
    key = None
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                prefix, ext = base_plus_ext(member_name(member.name))
                if not member.isreg() or prefix is None:
                    continue
                if prefix != key:
                    key = prefix
                    samples.append({})
                if ext.lower() in ("txt", "cls", "json"):
                    samples[-1][ext.lower()] = tar.extractfile(member).read()
                elif ext.lower() in IMAGE_KEYS:
                    samples[-1][IMAGE] = b""  # it has one (its bytes are not read)
    except (tarfile.TarError, OSError) as error:
        return samples, str(error)
    return samples, None


def scan(
    shards: list[str], label_key: str | None, retries: int = 0
) -> tuple[list[int], list[Any], list[str], list[str]]:
    """One pass over the shards' small members (images are skipped, not read): per shard its
    sample count, every text, the labels of the samples with an image and a text (a sample
    refused for lacking one makes no class), and per damaged shard "SHARD: error" (its
    samples before the damage are counted)."""
    counts, labels, texts, damaged = [], [], [], []
    for shard in shards:
        samples, error = _small_members(shard, retries)
        if error is not None:
            damaged.append(f"{shard}: {error}")
        counts.append(len(samples))
        for entry in samples:
            texts.append(entry.get("txt", b"").decode("utf-8", errors="replace"))
            if label_key is not None and IMAGE in entry and texts[-1].strip():
                labels.append(raw_label(entry, label_key)[1])
    return counts, labels, texts, damaged
