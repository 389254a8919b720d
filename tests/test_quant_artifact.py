"""The artifact container: exact round trips, corruption / truncation / version errors, no pickle, size law."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.config.schema import QuantConfig
from pgolf.quant import ArtifactError, decode_artifact, encode_artifact, read_artifact, write_artifact
from pgolf.quant.artifact import FORMAT_PERGROUP, FORMAT_VERSION, byte_shuffle, byte_unshuffle
from pgolf.quant.scheme import dequantize_state_dict, quantize_state_dict


def role(name: str, t: torch.Tensor) -> str:
    if name == "tok_emb.weight":
        return "embed"
    return "matrix" if name.startswith("blocks.") and t.dim() == 2 else "control"


def heavy_state(seed: int = 0, rows: int = 64, cols: int = 96) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    t = lambda r, c: torch.distributions.StudentT(4.0).sample((r, c)) * 0.02
    return {
        "tok_emb.weight": t(128, cols).to(torch.bfloat16),
        "blocks.0.attn.c_q.weight": t(rows, cols),
        "blocks.0.mlp.fc.weight": t(2 * rows, cols),
        "blocks.0.attn_scale": torch.rand(cols) + 0.5,
        "skip_weights": torch.rand(2, cols),
        "step": torch.tensor([7, 8], dtype=torch.int64),  # a non-float entry: stored raw
    }


@pytest.fixture(scope="module")
def quantized():
    return quantize_state_dict(heavy_state(), {}, QuantConfig(method="rtn"), role)


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "zstd", "zlib"])
@pytest.mark.parametrize("shuffle", ["none", "bshf2", "planes"])
def test_round_trip_is_exact(quantized, compressor, shuffle):
    blob, sizes = encode_artifact(quantized, compressor, shuffle, {"preset": "test"})
    back, header = decode_artifact(blob)
    assert header["meta"] == {"preset": "test"} and header["format_version"] == FORMAT_VERSION
    assert sum(sizes.values()) == len(blob)  # every byte is attributed to the header or one class frame
    mem, disk = dequantize_state_dict(quantized), dequantize_state_dict(back)
    assert list(mem) == list(disk)
    for name in mem:
        assert mem[name].dtype == disk[name].dtype, name
        assert torch.equal(mem[name], disk[name]), name
        assert torch.equal(quantized[name].data, back[name].data), name
    assert (
        disk["tok_emb.weight"].dtype == torch.bfloat16 and disk["blocks.0.attn_scale"].dtype == torch.float32
    )


def test_write_and_read_file(tmp_path, quantized):
    path = tmp_path / "model.ptz"
    sizes = write_artifact(path, quantized, "brotli", "bshf2")
    assert path.stat().st_size == sum(sizes.values())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file
    back, _ = read_artifact(path)
    assert torch.equal(back["blocks.0.mlp.fc.weight"].data, quantized["blocks.0.mlp.fc.weight"].data)


def test_every_single_flipped_byte_is_detected(quantized):
    blob, _ = encode_artifact(quantized, "zlib", "bshf2")
    # magic and version bytes give their own errors; every other byte is covered by the CRC / sha256
    for pos in list(range(12, len(blob), max(1, len(blob) // 300))) + [len(blob) - 1, 20, 47, 49]:
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(ArtifactError, match="checksum|truncated|unexpected bytes"):
            decode_artifact(bytes(bad))
    bad = bytearray(blob)
    bad[len(blob) // 2] ^= 0xFF
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        decode_artifact(bytes(bad), "model.ptz")


def test_truncated_bad_magic_and_future_version(quantized):
    blob, _ = encode_artifact(quantized, "brotli", "none")
    for cut in (5, 30, 60, len(blob) - 1):
        with pytest.raises(ArtifactError, match="truncated|not a pgolf artifact"):
            decode_artifact(blob[:cut], "model.ptz")
    with pytest.raises(ArtifactError, match="model.ptz: truncated"):
        decode_artifact(blob[: len(blob) - 10], "model.ptz")
    with pytest.raises(ArtifactError, match="not a pgolf artifact"):
        decode_artifact(b"PK\x03\x04" + blob[4:])
    future = blob[:8] + struct.pack("<H", FORMAT_PERGROUP + 1) + blob[10:]
    with pytest.raises(ArtifactError, match="written by a newer pgolf"):
        decode_artifact(future)
    with pytest.raises(FileNotFoundError):
        read_artifact("/nonexistent/model.ptz")


def test_reading_never_unpickles(monkeypatch, quantized):
    blob, _ = encode_artifact(quantized, "zlib", "planes")

    def forbidden(*args, **kwargs):
        raise AssertionError("the artifact reader must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    back, _ = decode_artifact(blob)
    assert set(back) == set(quantized)


def test_byte_shuffle_inverts_for_any_length_and_stride():
    for n in (0, 1, 7, 64, 101):
        data = bytes(range(256))[:n] * 3
        for stride in (2, 3, 4):
            assert byte_unshuffle(byte_shuffle(data, stride), stride) == data
    assert byte_shuffle(b"abcdef") == b"acebdf"


def test_sdclip_size_law_bytes_fall_as_k_rises():
    """At fixed bits, a wider clip (larger k) means coarser steps and fewer distinct codes: fewer bytes."""
    state = {k: v for k, v in heavy_state(seed=1, rows=128, cols=256).items() if k.startswith("blocks.")}
    sizes = []
    for k in (4.0, 8.0, 12.85, 20.0):
        qt = quantize_state_dict(state, {}, QuantConfig(method="rtn", matrix_clip_sigmas=k), role)
        sizes.append(encode_artifact(qt, "brotli", "bshf2")[1]["matrix"])
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes


def test_bits_16_stores_the_class_in_fp16():
    """matrix_bits=16 / embed_bits=16 keep that class unquantized (fp16): dequantized weights are the fp16
    rounding of the originals, and the other class is still quantized; 9 bits is refused by name."""
    state = heavy_state(seed=2)
    qt = quantize_state_dict(state, {}, QuantConfig(method="rtn", matrix_bits=16), role)
    back = dequantize_state_dict(qt)
    for name in ("blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight"):
        assert qt[name].scheme == "fp16"
        assert torch.equal(back[name], state[name].half().float())
    assert qt["tok_emb.weight"].scheme == "int8"
    qt = quantize_state_dict(state, {}, QuantConfig(method="rtn", matrix_bits=16, embed_bits=16), role)
    assert qt["tok_emb.weight"].scheme == "fp16"
    with pytest.raises(ValueError, match="quant.matrix_bits=9"):
        quantize_state_dict(state, {}, QuantConfig(method="rtn", matrix_bits=9), role)


# ------------------------------------------------------------------------------------ per-group (v2)
def test_default_compressors_still_write_format_version_1(quantized):
    for compressor in ("brotli", "lzma", "zstd", "zlib"):
        blob, _ = encode_artifact(quantized, compressor, "bshf2")
        assert struct.unpack_from("<H", blob, 8)[0] == 1


def frame_codecs(blob: bytes) -> list[str]:
    """The codec id of each frame, read from the file's own frame table."""
    from pgolf.quant.artifact import _FIXED
    from pgolf.quant.codecs import CODEC_IDS

    nframes = struct.unpack_from("<H", blob, _FIXED.size - 2)[0]
    ids = blob[_FIXED.size + 4 * nframes : _FIXED.size + 5 * nframes]
    return [CODEC_IDS[i].name for i in ids]


def test_pergroup_round_trip_records_its_codecs(quantized):
    from pgolf.quant.artifact import encode_pergroup

    blob, sizes, report = encode_pergroup(quantized, {"preset": "t"}, reorder=("embed", "attn.c_q", "mlp.fc"))
    back, header = decode_artifact(blob)
    assert struct.unpack_from("<H", blob, 8)[0] == FORMAT_PERGROUP and header["meta"] == {"preset": "t"}
    assert header["groups"][:3] == ["embed", "attn.c_q", "mlp.fc"] and "remainder" in header["groups"]
    assert sum(sizes.values()) == len(blob)
    codecs = frame_codecs(blob)
    assert codecs[1:] == [report[g]["codec"] for g in header["groups"]]  # the file names each codec
    for g in header["groups"]:
        assert report[g]["bytes"] == min(report[g]["codecs"].values()) == sizes[g]
    for name, qt in quantized.items():
        assert torch.equal(qt.data, back[name].data), name
        assert qt.data.dtype == back[name].data.dtype and qt.dtype == back[name].dtype
        assert (qt.scale is None and back[name].scale is None) or torch.equal(qt.scale, back[name].scale)
    assert encode_artifact(quantized, "pergroup")[0] == encode_pergroup(quantized)[0]


def test_reordering_is_kept_only_when_it_pays_and_inverts_exactly():
    """Rows that are shuffled copies of 8 prototypes: the similarity chain puts copies together, which a
    context coder exploits, and the stored permutation restores the original order bit-exactly."""
    from pgolf.quant.artifact import encode_pergroup
    from pgolf.quant.scheme import QuantizedTensor

    torch.manual_seed(3)
    protos = torch.randint(-31, 32, (8, 64), dtype=torch.int8)
    rows = protos[torch.randint(0, 8, (256,))]
    qt = QuantizedTensor(
        "blocks.0.attn.c_q.weight", "matrix", "int6", 6, rows, torch.rand(256).half(), torch.float32
    )
    noise = torch.randint(-3, 4, (64, 64), dtype=torch.int8)
    qk = QuantizedTensor(
        "blocks.0.attn.c_k.weight", "matrix", "int6", 6, noise, torch.rand(64).half(), torch.float32
    )
    qts = {qt.name: qt, qk.name: qk}
    blob, sizes, report = encode_pergroup(qts, reorder=("attn.c_q", "attn.c_k"))
    assert report["attn.c_q"]["reordered"] and "perms" in sizes
    assert report["attn.c_q"]["bytes"] + sizes["perms"] < report["attn.c_q"]["unordered_bytes"]
    assert not report["attn.c_k"]["reordered"]  # noise: sorting cannot pay for its permutation
    back, header = decode_artifact(blob)
    assert [e.get("perm") for e in header["tensors"]] == [1, 0]
    assert torch.equal(back[qt.name].data, rows) and torch.equal(back[qk.name].data, noise)
    plain, _, _ = encode_pergroup(qts)
    assert len(blob) < len(plain)


def test_pergroup_corruption_is_detected(quantized):
    blob, _ = encode_artifact(quantized, "pergroup")
    for pos in range(12, len(blob), max(1, len(blob) // 100)):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(ArtifactError):
            decode_artifact(bytes(bad))


def test_reading_a_pergroup_file_never_unpickles(monkeypatch, quantized):
    blob, _ = encode_artifact(quantized, "pergroup")

    def forbidden(*args, **kwargs):
        raise AssertionError("the artifact reader must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    back, _ = decode_artifact(blob)
    assert set(back) == set(quantized)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    cols=st.integers(1, 24),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_pergroup_round_trips_random_code_tensors(rows, cols, bits, seed):
    """Any shapes and widths, every group reordered when it pays: the codes come back bit-exactly."""
    from pgolf.quant.artifact import encode_pergroup
    from pgolf.quant.scheme import QuantizedTensor

    g = torch.Generator().manual_seed(seed)
    r = 2 ** (bits - 1) - 1
    qts = {}
    for i, n in enumerate(rows):
        name = f"blocks.{i}.mlp.fc.weight"
        q = torch.randint(-r, r + 1, (n, cols), generator=g, dtype=torch.int8) // torch.randint(
            1, 4, (1,), generator=g
        ).to(torch.int8)
        qts[name] = QuantizedTensor(
            name, "matrix", f"int{bits}", bits, q, torch.rand(n, generator=g).half(), torch.float32
        )
    blob, _, _ = encode_pergroup(qts, codecs=["raw", "ppmd4", "ans"], reorder=("mlp.fc",))
    back, _ = decode_artifact(blob)
    for name, qt in qts.items():
        assert torch.equal(back[name].data, qt.data) and torch.equal(back[name].scale, qt.scale)


def test_the_bundle_carries_the_per_group_reader():
    """The single-file train_gpt.py is the import closure of the entry point: it must hold every module the
    per-group reader needs (the codec libraries themselves are imported, not bundled)."""
    from pgolf.singlefile import collect_modules

    modules = collect_modules()
    for name in ("codecs", "pergroup", "reorder", "tensorbytes", "fit"):
        assert f"pgolf.quant.{name}" in modules, name


def test_reorder_groups_must_name_a_code_group():
    from pgolf.quant.pergroup import check_reorder_groups

    state = heavy_state()
    check_reorder_groups(state, role, ["embed", "attn.c_q", "mlp.fc"])
    with pytest.raises(ValueError, match=r"quant.reorder_groups: \['mlp.up'\] name no code group"):
        check_reorder_groups(state, role, ["embed", "mlp.up"])
