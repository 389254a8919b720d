"""The artifact file (RUN_DIR/model.ptz): quantized tensors in a documented container, no pickle.

Reading never executes code: the file is bytes, a JSON table and raw little-endian arrays.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"PGOLFQ01" (the same for every format version)
    8       2     u16 format version (this module writes FORMAT_VERSION = 1)
    10      1     u8 compressor id: 1 brotli (quality 11, window 2^24), 2 lzma (preset 9e),
                  3 zstd (level 22), 4 zlib (level 9)
    11      1     u8 shuffle id: 0 none, 1 bshf2 (each frame byte-shuffled with stride 2, SPEC §4.6),
                  2 planes (fp16 arrays stored as byte planes, see "layout" below; frames unshuffled)
    12      4     u32 CRC-32 of the whole file except these 4 bytes (catches corruption before decompressing)
    16      32    sha256 of the container (below), checked after decompression
    48      2     u16 number of frames F
    50      4·F   u32 compressed length of each frame
    50+4F   ...   the F compressed frames, back to back; the file ends exactly after the last one

Container = the decompressed (and unshuffled) frames concatenated:

    u32 n, then n bytes of UTF-8 JSON (the header), then the payload (header["payload_bytes"] bytes).

Frame 0 holds the u32 and the JSON; each further frame holds the payload section of one tensor class
(matrix, embed, head, control, in that order), so the compressed bytes of each class are exact numbers
(header["frames"]: class, offset into the payload, raw nbytes).

Header JSON: {"format_version", "payload_bytes", "frames", "tensors": [...], "meta": {...}}. Each tensor:
name, class, scheme (int{b} | fp16 | raw), bits, dtype (what dequantization returns), shape, storage
(payload dtype: int8 | float16 | the raw dtype), layout (plain | planes: an fp16 array as all low bytes
then all high bytes, so the slowly varying exponent bytes sit together), offset and nbytes in the payload,
and for int schemes "scale": {dtype float16, per "row", layout, offset, nbytes}. Dequantized W = q·s_r.

int6 values are stored one per int8 byte: the entropy coder removes the unused top bits (§4.6).

Format version 2 (compressor id 5, `quant.compressor = "pergroup"`, SPEC-1855 §5): the same fixed header
(shuffle id 0) and u32 frame lengths, then one u8 codec id per frame (pgolf.quant.codecs), then the frames.
Frame 0 is the header JSON alone; then one frame per code group (pgolf.quant.pergroup: the int codes of one
tensor kind across layers, column-major, rows optionally reordered), the remainder (the data of every
non-code tensor in table order, then the fp16 scales of every int tensor in table order, fp16 as byte
planes) and, when any tensor is reordered, the perms frame (pgolf.quant.reorder). The sha256 covers the
decoded frames. Offsets are implicit (each stream is its members in table order), so each tensor entry
has name, class, scheme, bits, dtype, shape, storage, layout, group, and for int schemes "perm" (0/1).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pgolf.fileio import atomic_write_bytes
from pgolf.quant.codecs import CODECS, CodecError, decode_with, encode_best
from pgolf.quant.pergroup import (
    PERMS,
    REMAINDER,
    GroupCoding,
    code_groups,
    encode_code_group,
    from_colmajor,
    group_of,
)
from pgolf.quant.reorder import decode_orders, encode_orders
from pgolf.quant.scheme import CLASSES, QuantizedTensor
from pgolf.quant.tensorbytes import DTYPES, byte_shuffle, byte_unshuffle, dtype_name, from_bytes, to_bytes

if TYPE_CHECKING:  # the annotation proves qcfg's class to pgolf.fold
    from pgolf.config.schema import QuantConfig

MAGIC = b"PGOLFQ01"
FORMAT_VERSION = 1
FORMAT_PERGROUP = 2  # the per-group container; version 1 files stay byte-identical to before
COMPRESSORS = {"brotli": 1, "lzma": 2, "zstd": 3, "zlib": 4, "pergroup": 5}
SHUFFLES = {"none": 0, "bshf2": 1, "planes": 2}
_FIXED = struct.Struct("<8sHBBI32sH")  # magic, version, compressor, shuffle, crc32, sha256, frames


class ArtifactError(ValueError):
    """The artifact file is malformed, corrupted, truncated or from a newer pgolf; the message says which."""


def compress(data: bytes, compressor: str) -> bytes:
    if compressor == "brotli":
        import brotli

        return brotli.compress(data, quality=11, lgwin=24)
    if compressor == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=22).compress(data)
    if compressor == "zlib":
        return zlib.compress(data, 9)
    raise ValueError(f"unknown compressor {compressor!r}; expected one of {', '.join(COMPRESSORS)}")


def decompress(data: bytes, compressor: str) -> bytes:
    if compressor == "brotli":
        import brotli

        return brotli.decompress(data)
    if compressor == "lzma":
        return lzma.decompress(data)
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data)
    return zlib.decompress(data)


def _entry(qt: QuantizedTensor, layout: str, **where: Any) -> dict[str, Any]:
    """A tensor's header entry: what it is, how its bytes are laid out, and where they are (`where`)."""
    return {
        "name": qt.name,
        "class": qt.cls,
        "scheme": qt.scheme,
        "bits": qt.bits,
        "dtype": dtype_name(qt.dtype),
        "shape": list(qt.data.shape),
        "storage": dtype_name(qt.data.dtype),
        "layout": layout,
        **where,
    }


def encode_artifact(
    qtensors: Mapping[str, QuantizedTensor],
    compressor: str = "brotli",
    shuffle: str = "planes",
    meta: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, int]]:
    """The artifact bytes and the compressed bytes of each frame ({"header": .., CLASS: ..}); for
    "pergroup" the frames are the groups (encode_pergroup with all codecs and no reordering)."""
    if compressor == "pergroup":
        blob, sizes, _ = encode_pergroup(qtensors, meta)
        return blob, sizes
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}; expected one of {', '.join(COMPRESSORS)}")
    if shuffle not in SHUFFLES:
        raise ValueError(f"unknown shuffle {shuffle!r}; expected one of {', '.join(SHUFFLES)}")
    fp16_layout = "planes" if shuffle == "planes" else "plain"
    sections: list[tuple[str, bytearray]] = []
    entries = []
    offset = 0
    for cls in CLASSES + tuple(sorted({qt.cls for qt in qtensors.values()} - set(CLASSES))):
        members = [qt for qt in qtensors.values() if qt.cls == cls]
        if not members:
            continue
        section = bytearray()
        # values of the class first, then its scales: like data sits next to like data for the coder
        for qt in members:
            layout = fp16_layout if qt.data.dtype == torch.float16 else "plain"
            raw = to_bytes(qt.data, layout)
            entries.append(_entry(qt, layout, offset=offset + len(section), nbytes=len(raw)))
            section += raw
        for qt, entry in zip(members, entries[-len(members) :]):
            if qt.scale is None:
                continue
            raw = to_bytes(qt.scale.to(torch.float16), fp16_layout)
            entry["scale"] = {
                "dtype": "float16",
                "per": "row",
                "layout": fp16_layout,
                "offset": offset + len(section),
                "nbytes": len(raw),
            }
            section += raw
        sections.append((cls, section))
        offset += len(section)
    order = {name: i for i, name in enumerate(qtensors)}
    entries.sort(key=lambda e: order[e["name"]])  # the table keeps state_dict order; offsets say where
    header = {
        "format_version": FORMAT_VERSION,
        "payload_bytes": offset,
        "frames": [],
        "tensors": entries,
        "meta": dict(meta or {}),
    }
    start = 0
    for cls, section in sections:
        header["frames"].append({"class": cls, "offset": start, "nbytes": len(section)})
        start += len(section)
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw_frames = [struct.pack("<I", len(js)) + js] + [bytes(s) for _, s in sections]
    sha = hashlib.sha256(b"".join(raw_frames)).digest()
    if shuffle == "bshf2":
        raw_frames = [byte_shuffle(f, 2) for f in raw_frames]
    frames = [compress(f, compressor) for f in raw_frames]
    fixed = _FIXED.pack(
        MAGIC, FORMAT_VERSION, COMPRESSORS[compressor], SHUFFLES[shuffle], 0, sha, len(frames)
    )
    lengths = struct.pack(f"<{len(frames)}I", *(len(f) for f in frames))
    body = fixed + lengths + b"".join(frames)
    crc = zlib.crc32(body[:12] + body[16:])
    blob = body[:12] + struct.pack("<I", crc) + body[16:]
    sizes = {"header": _FIXED.size + len(lengths) + len(frames[0])}
    for (cls, _), f in zip(sections, frames[1:]):
        sizes[cls] = len(f)
    return blob, sizes


DEFAULT_REORDER = ("embed", "attn.c_q", "mlp.fc")  # the groups #1855 similarity-sorts


def encode_pergroup(
    qtensors: Mapping[str, QuantizedTensor],
    meta: Mapping[str, Any] | None = None,
    codecs: list[str] | tuple[str, ...] = tuple(CODECS),
    reorder: list[str] | tuple[str, ...] = (),
) -> tuple[bytes, dict[str, int], dict[str, dict[str, Any]]]:
    """Format version 2: (artifact bytes, {"header" | group: stored bytes}, {group: coding report}).

    Each stream gets the smallest codec of `codecs`; code groups named in `reorder` are row-reordered
    when that pays for its permutation bytes. The report per group: raw and stored bytes, the entropy
    bound n·H/8 of the stored stream, the codec, every codec's bytes, brotli-11's bytes on the same stream
    and whether the rows were reordered (the permutation bytes are the perms group's)."""
    groups = code_groups(dict(qtensors))
    codings: list[GroupCoding] = [encode_code_group(g, m, codecs, g in reorder) for g, m in groups.items()]
    orders = {name: order for c in codings for name, order in c.orders.items()}
    fp16_layout = "planes"
    entries, remainder, scales = [], bytearray(), bytearray()
    for qt in qtensors.values():
        group = group_of(qt)
        layout = fp16_layout if qt.data.dtype == torch.float16 else "plain"
        entry = _entry(qt, "colmajor" if group != REMAINDER else layout, group=group)
        if group == REMAINDER:
            remainder += to_bytes(qt.data, layout)
        else:
            entry["perm"] = int(qt.name in orders)
        if qt.scale is not None:
            scales += to_bytes(qt.scale.to(torch.float16), fp16_layout)
        entries.append(entry)
    streams = [(c.name, c.raw, c.codec, c.blob) for c in codings]
    for name, raw in ((REMAINDER, bytes(remainder + scales)), (PERMS, encode_orders(list(orders.values())))):
        if raw or name == REMAINDER:
            codec, blob, tried = encode_best(raw, codecs)
            streams.append((name, raw, codec, blob))
            codings.append(GroupCoding(name, raw, codec, blob, tried, unordered_bytes=len(blob)))
    header = {
        "format_version": FORMAT_PERGROUP,
        "groups": [name for name, *_ in streams],
        "tensors": entries,
        "meta": dict(meta or {}),
    }
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h_codec, h_blob, _ = encode_best(js, codecs)
    raws = [js] + [raw for _, raw, _, _ in streams]
    frames = [h_blob] + [blob for *_, blob in streams]
    ids = [CODECS[h_codec].id] + [CODECS[codec].id for _, _, codec, _ in streams]
    sha = hashlib.sha256(b"".join(raws)).digest()
    fixed = _FIXED.pack(MAGIC, FORMAT_PERGROUP, COMPRESSORS["pergroup"], 0, 0, sha, len(frames))
    table = struct.pack(f"<{len(frames)}I", *(len(f) for f in frames)) + bytes(ids)
    body = fixed + table + b"".join(frames)
    blob = body[:12] + struct.pack("<I", zlib.crc32(body[:12] + body[16:])) + body[16:]
    sizes = {"header": _FIXED.size + len(table) + len(h_blob)}
    sizes.update({name: len(f) for (name, *_), f in zip(streams, frames[1:])})
    report = {
        c.name: {
            "raw": len(c.raw),
            "bytes": len(c.blob),
            "entropy_bound": round(c.entropy_bound, 1),
            "codec": c.codec,
            "codecs": c.tried,
            "brotli11": c.tried.get("brotli") or len(CODECS["brotli"].encode(c.raw)),
            "reordered": bool(c.orders),
            "unordered_bytes": c.unordered_bytes,
        }
        for c in codings
    }
    return blob, sizes, report


def _decode_pergroup(
    blob: bytes, nframes: int, lengths: tuple[int, ...], sha: bytes, source: str
) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    ids = blob[_FIXED.size + 4 * nframes : _FIXED.size + 5 * nframes]
    pos = _FIXED.size + 5 * nframes
    raws = []
    for n, codec_id in zip(lengths, ids):
        try:
            raws.append(decode_with(blob[pos : pos + n], codec_id))
        except CodecError as err:
            raise ArtifactError(f"{source}: a frame failed to decode ({err})") from err
        pos += n
    if hashlib.sha256(b"".join(raws)).digest() != sha:
        raise ArtifactError(f"{source}: checksum mismatch (sha256 of the decoded frames)")
    header = json.loads(raws[0].decode("utf-8"))
    if len(header.get("groups", ())) != nframes - 1:
        raise ArtifactError(f"{source}: {nframes - 1} frames for the groups {header.get('groups')}")
    streams = dict(zip(header["groups"], raws[1:]))
    cursor = dict.fromkeys(streams, 0)

    def take(group: str, n: int, what: str) -> bytes:
        data, at = streams.get(group, b""), cursor.get(group, 0)
        if at + n > len(data):
            raise ArtifactError(f"{source}: {what}: group {group!r} ends before its {n} bytes")
        cursor[group] = at + n
        return data[at : at + n]

    permuted = [e for e in header["tensors"] if e.get("perm")]
    orders = decode_orders(streams.get(PERMS, b""), [e["shape"][0] for e in permuted])
    order_of = {e["name"]: o for e, o in zip(permuted, orders)}
    out = {}
    for e in header["tensors"]:
        if e["storage"] not in DTYPES or e["dtype"] not in DTYPES:
            raise ArtifactError(
                f"{source}: tensor {e['name']}: unsupported dtype {e['storage']}/{e['dtype']}"
            )
        numel = int(np.prod(e["shape"])) if e["shape"] else 1
        nbytes = numel * torch.empty((), dtype=DTYPES[e["storage"]]).element_size()
        raw = take(e["group"], nbytes, e["name"])
        if e["group"] == REMAINDER:
            data = from_bytes(raw, e["storage"], e["shape"], e["layout"])
        else:
            data = from_colmajor(raw, e["shape"], order_of.get(e["name"]))
        out[e["name"]] = QuantizedTensor(
            e["name"], e["class"], e["scheme"], int(e["bits"]), data, None, DTYPES[e["dtype"]]
        )
    for e in header["tensors"]:
        if e["scheme"].startswith("int"):
            rows = e["shape"][0]
            raw = take(REMAINDER, 2 * rows, e["name"] + " scale")
            out[e["name"]].scale = from_bytes(raw, "float16", [rows], "planes")
    if any(cursor[g] != len(streams[g]) for g in streams if g != PERMS):
        raise ArtifactError(f"{source}: unexpected bytes at the end of a group stream")
    return out, header


def encode_configured(
    qtensors: Mapping[str, QuantizedTensor], qcfg: QuantConfig, meta: Mapping[str, Any] | None = None
) -> tuple[bytes, dict[str, int], dict[str, dict[str, Any]] | None]:
    """The artifact quant.compressor / shuffle / codecs / reorder_groups of `qcfg` (a QuantConfig) ask for:
    (bytes, stored bytes per frame, the per-group coding report or None for a version-1 container)."""
    if qcfg.compressor == "pergroup":
        return encode_pergroup(qtensors, meta, qcfg.codecs, qcfg.reorder_groups)
    blob, sizes = encode_artifact(qtensors, qcfg.compressor, qcfg.shuffle, meta)
    return blob, sizes, None


def write_artifact(
    path: str | Path,
    qtensors: Mapping[str, QuantizedTensor],
    compressor: str = "brotli",
    shuffle: str = "planes",
    meta: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Encode and write atomically; returns the compressed bytes per frame (see encode_artifact)."""
    blob, sizes = encode_artifact(qtensors, compressor, shuffle, meta)
    atomic_write_bytes(path, blob)
    return sizes


def decode_artifact(
    blob: bytes, source: str = "<bytes>"
) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Parse and verify artifact bytes; returns (tensors by name, header JSON). Raises ArtifactError."""
    if len(blob) < 10 or blob[:8] != MAGIC:
        raise ArtifactError(f"{source}: not a pgolf artifact (expected magic {MAGIC!r} at the start)")
    (version,) = struct.unpack_from("<H", blob, 8)
    if version > FORMAT_PERGROUP:
        raise ArtifactError(
            f"{source}: format version {version} was written by a newer pgolf "
            f"(this one reads up to version {FORMAT_PERGROUP}); upgrade pgolf to read it"
        )
    if version < 1:
        raise ArtifactError(f"{source}: invalid format version {version}")
    if len(blob) < _FIXED.size:
        raise ArtifactError(
            f"{source}: truncated: {len(blob)} bytes, shorter than the {_FIXED.size}-byte header"
        )
    _, _, comp_id, shuf_id, crc, sha, nframes = _FIXED.unpack_from(blob, 0)
    table_end = _FIXED.size + (5 if version == FORMAT_PERGROUP else 4) * nframes
    if len(blob) < table_end:
        raise ArtifactError(f"{source}: truncated: {len(blob)} bytes, the frame table needs {table_end}")
    lengths = struct.unpack_from(f"<{nframes}I", blob, _FIXED.size)
    expected = table_end + sum(lengths)
    if len(blob) < expected:
        raise ArtifactError(f"{source}: truncated: {len(blob)} bytes, the header promises {expected}")
    if len(blob) > expected:
        raise ArtifactError(f"{source}: {len(blob) - expected} unexpected bytes after the last frame")
    if zlib.crc32(blob[:12] + blob[16:]) != crc:
        raise ArtifactError(f"{source}: checksum mismatch (CRC-32 of the file): the file is corrupted")
    if version == FORMAT_PERGROUP:
        return _decode_pergroup(blob, nframes, lengths, sha, source)
    compressors = {v: k for k, v in COMPRESSORS.items()}
    shuffles = {v: k for k, v in SHUFFLES.items()}
    if comp_id not in compressors or shuf_id not in shuffles:
        raise ArtifactError(f"{source}: unknown compressor id {comp_id} or shuffle id {shuf_id}")
    raw_frames = []
    pos = table_end
    for n in lengths:
        try:
            frame = decompress(blob[pos : pos + n], compressors[comp_id])
        except Exception as err:  # every decoder has its own error type
            raise ArtifactError(f"{source}: a frame failed to decompress ({err})") from err
        raw_frames.append(byte_unshuffle(frame, 2) if shuffles[shuf_id] == "bshf2" else frame)
        pos += n
    container = b"".join(raw_frames)
    if hashlib.sha256(container).digest() != sha:
        raise ArtifactError(f"{source}: checksum mismatch (sha256 of the decompressed container)")
    (jlen,) = struct.unpack_from("<I", container, 0)
    header = json.loads(container[4 : 4 + jlen].decode("utf-8"))
    payload = container[4 + jlen :]
    if header.get("payload_bytes") != len(payload):
        raise ArtifactError(
            f"{source}: payload is {len(payload)} bytes, header says {header.get('payload_bytes')}"
        )
    return _tensors_from(header, payload, source), header


def _slice(payload: bytes, spec: Mapping[str, Any], what: str, source: str) -> bytes:
    off, n = int(spec["offset"]), int(spec["nbytes"])
    if off < 0 or n < 0 or off + n > len(payload):
        raise ArtifactError(
            f"{source}: {what}: bytes [{off}, {off + n}) lie outside the {len(payload)}-byte payload"
        )
    return payload[off : off + n]


def _tensors_from(header: Mapping[str, Any], payload: bytes, source: str) -> dict[str, QuantizedTensor]:
    out = {}
    for e in header["tensors"]:
        name = e["name"]
        if e["storage"] not in DTYPES or e["dtype"] not in DTYPES:
            raise ArtifactError(f"{source}: tensor {name}: unsupported dtype {e['storage']}/{e['dtype']}")
        numel = int(np.prod(e["shape"])) if e["shape"] else 1
        itemsize = torch.empty((), dtype=DTYPES[e["storage"]]).element_size()
        if numel * itemsize != int(e["nbytes"]):
            raise ArtifactError(
                f"{source}: tensor {name}: shape {e['shape']} needs {numel * itemsize} bytes, table says {e['nbytes']}"
            )
        data = from_bytes(_slice(payload, e, name, source), e["storage"], e["shape"], e["layout"])
        scale = None
        if "scale" in e:
            sc = e["scale"]
            rows = e["shape"][0]
            if int(sc["nbytes"]) != 2 * rows:
                raise ArtifactError(f"{source}: tensor {name}: {sc['nbytes']} scale bytes for {rows} rows")
            scale = from_bytes(_slice(payload, sc, name + " scale", source), "float16", [rows], sc["layout"])
        out[name] = QuantizedTensor(
            name, e["class"], e["scheme"], int(e["bits"]), data, scale, DTYPES[e["dtype"]]
        )
    return out


def read_artifact(path: str | Path) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Read and verify an artifact file: (tensors by name, header JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: artifact file does not exist")
    return decode_artifact(path.read_bytes(), str(path))
