"""Save / load on a toy model: round trip, integrity checks, transforms stored once, size breakdown."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantcompose.saving as saving
from quantcompose.errors import ModelLoadError
from quantcompose.pipeline import quantize_model
from quantcompose.qlinear import QuantLinear
from quantcompose.saved_files import file_record
from quantcompose.saving import load_quantized, save_quantized, saved_size_breakdown
from quantcompose.strategy import QuantSettings

from toymodel import tiny_llama

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _quantized(wbits=4, abits=8):
    model = tiny_llama()
    quantize_model(model, torch.randint(0, 128, (2, 16)), "duquant", QuantSettings(wbits=wbits, abits=abits),
                   {"block_size": 32, "steps": 4}, progress=False)
    return model


@pytest.fixture(scope="module")
def w4a4():
    return _quantized(4, 4)


@pytest.fixture
def saved(w4a4, tmp_path):
    save_quantized(w4a4, tmp_path / "m")
    return tmp_path / "m"


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _edit_manifest(path, edit, rechecksum=False):
    """Apply ``edit`` to the manifest; with ``rechecksum`` the checksums are made to agree (a careful editor)."""
    file = path / saving.CONFIG_NAME
    manifest = json.loads(file.read_text())
    edit(manifest)
    if rechecksum:
        manifest.pop("checksums")
        manifest["checksums"] = saving._section_digests(manifest)
    file.write_text(json.dumps(manifest))


def _manifest(path):
    return json.loads((path / saving.CONFIG_NAME).read_text())


def _holder(path, name, section="tensors"):
    """The file of the saved model at ``path`` that holds tensor ``name`` of ``section``."""
    return path / _manifest(path)["weight_files"][section][name]


def _refresh_file_record(path, name):
    """Record a rewritten file's size and hash (and tensor shapes) as if it had been saved so."""
    data = (path / name).read_bytes()
    weights, transforms = saving._split_shard(_manifest(path), name, load_file(str(path / name)))

    def edit(manifest):
        manifest["files"][name] = {"sha256": saving._file_digest(data), "size": len(data)}
        for section, tensors in (("tensors", weights), ("transform_tensors", transforms)):
            manifest[section].update({k: saving._describe(t) for k, t in tensors.items()})

    _edit_manifest(path, edit, rechecksum=True)


def test_round_trip_w4a4_gives_bit_identical_logits(w4a4, saved):
    loaded, tokenizer = load_quantized(saved)
    assert tokenizer is None
    tokens = torch.randint(0, 128, (2, 20))
    assert torch.equal(_logits(loaded, tokens), _logits(w4a4, tokens))


def test_round_trip_w4a8(tmp_path):
    model = _quantized(4, 8)
    save_quantized(model, tmp_path / "m")
    tokens = torch.randint(0, 128, (2, 20))
    assert torch.equal(_logits(load_quantized(tmp_path / "m")[0], tokens), _logits(model, tokens))


def test_siblings_share_one_float16_transform_in_memory_on_disk_and_after_loading(w4a4, saved):
    # float16: the default QuantSettings.storage_dtype (quantcompose/storage.py).
    attn = w4a4.model.layers[0].self_attn
    assert attn.q_proj.transform is not None
    assert attn.q_proj.transform is attn.k_proj.transform is attn.v_proj.transform
    manifest = json.loads((saved / saving.CONFIG_NAME).read_text())
    layers = manifest["quantized_layers"]
    ids = {layers[f"model.layers.0.self_attn.{p}"]["transform"] for p in ("q_proj", "k_proj", "v_proj")}
    assert len(ids) == 1 and None not in ids
    distinct = {id(m.transform) for m in w4a4.modules() if isinstance(m, QuantLinear) and m.transform is not None}
    assert len(manifest["transforms"]) == len(distinct) < sum(1 for v in layers.values() if v["transform"])
    assert {d["dtype"] for d in manifest["transform_tensors"].values() if d["dtype"] != "int64"} == {"float16"}
    loaded = load_quantized(saved)[0].model.layers[0].self_attn
    assert loaded.q_proj.transform is loaded.k_proj.transform is loaded.v_proj.transform
    assert loaded.q_proj.transform == attn.q_proj.transform


def test_loading_quantizes_nothing(saved, monkeypatch):
    import quantcompose.qlinear as qlinear

    def refuse(*args, **kwargs):
        raise AssertionError("load_quantized quantized a placeholder weight")

    monkeypatch.setattr(qlinear, "quantize", refuse)
    load_quantized(saved)


def test_size_breakdown_adds_up_and_compares_with_float16(w4a4, saved):
    size = saved_size_breakdown(saved)
    assert size.total == saving.directory_size(saved)
    original = tiny_llama()
    assert size.fp16 == 2 * sum(p.numel() for p in original.parameters())
    codes = sum(m.weight_codes.numel() for m in w4a4.modules() if isinstance(m, QuantLinear))
    assert size.codes == codes
    assert size.transforms > 0 and size.floats > 0 and size.scales > 0
    assert "x the float16 model" in size.format()


def test_refuses_to_overwrite_without_permission(w4a4, tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(w4a4, tmp_path / "m")


def test_failed_save_leaves_nothing_behind(w4a4, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(w4a4, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a saved quantcompose model"):
        load_quantized(tmp_path)


# ------------------------------------------------------------ damaged or edited models
def _flip_symmetric(manifest):
    spec = manifest["quantized_layers"][Q_PROJ]["weight_spec"]
    spec["symmetric"] = not spec["symmetric"]


def _set_bits(bits):
    def edit(manifest):
        manifest["quantized_layers"][Q_PROJ]["weight_spec"]["bits"] = bits
    return edit


def _per_group(size):
    def edit(manifest):
        manifest["quantized_layers"][Q_PROJ]["weight_spec"].update(granularity="group", group_size=size)
    return edit


def _drop_transform(manifest):
    key = manifest["quantized_layers"][Q_PROJ]["transform"]
    del manifest["transforms"][key]


def _unset_layer_transform(manifest):
    manifest["quantized_layers"][Q_PROJ]["transform"] = None


@pytest.mark.parametrize(
    "edit, rechecksum, message",
    [
        (_flip_symmetric, False, rf"field quantized_layers\['{Q_PROJ}'\] does not match its checksum"),
        (_flip_symmetric, True, r"weight_zero has nonzero zero points but .*symmetric is true"),
        (_set_bits(8), False, "does not match its checksum"),
        (_set_bits(8), True, rf"field quantized_layers\['{Q_PROJ}'\].packed is True but .*bits=8 .* implies False"),
        (_per_group(32), True, rf"tensor {Q_PROJ}.weight_scale is .*\[96, 1\].* implies .*\[96, 3, 1\]"),
        (_set_bits(3), True, r"weight_codes span \[0, 1[0-5]\] but .*bits=3 allows \[0, 7\]"),
        (_drop_transform, False, r"field transforms\['0'\] does not match its checksum"),
        (_drop_transform, True, r"names transform '0', which is not stored"),
        (_unset_layer_transform, False, "does not match its checksum"),
        (lambda m: m.update(format_version=1), False, "field format_version is 1"),
        (lambda m: m.pop("checksums"), False, "field checksums is missing"),
    ],
)
def test_an_edited_manifest_is_refused(saved, edit, rechecksum, message):
    _edit_manifest(saved, edit, rechecksum)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_quantized(saved)
    assert str(saved) in str(info.value)


def _tensor_offset(path, name):
    """Byte offset of tensor ``name``'s data in a safetensors file."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return 8 + header_len + header[name]["data_offsets"][0]


def test_a_flipped_bit_in_the_codes_is_refused(saved):
    file = _holder(saved, f"{Q_PROJ}.weight_codes")
    offset = _tensor_offset(file, f"{Q_PROJ}.weight_codes") + 5
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=rf"{file.name}: field sha256 does not match"):
        load_quantized(saved)


def test_a_scale_of_another_dtype_is_refused_even_when_the_hashes_agree(saved):
    file = _holder(saved, f"{Q_PROJ}.weight_scale")
    tensors = load_file(str(file))
    tensors[f"{Q_PROJ}.weight_scale"] = tensors[f"{Q_PROJ}.weight_scale"].double()
    save_file(tensors, str(file))
    with pytest.raises(ModelLoadError, match="sha256|size"):
        load_quantized(saved)
    _refresh_file_record(saved, file.name)
    with pytest.raises(ModelLoadError, match=rf"{file.name}: tensor {Q_PROJ}.weight_scale is .*float64.* implies .*float32"):
        load_quantized(saved)


def test_a_truncated_file_is_refused(saved):
    file = _holder(saved, next(iter(_manifest(saved)["transform_tensors"])), "transform_tensors")
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(ModelLoadError, match=rf"{file.name}: field size"):
        load_quantized(saved)


@pytest.mark.parametrize("name", ["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"])
def test_a_deleted_shard_is_refused(saved, name):
    (saved / name).unlink()
    with pytest.raises(ModelLoadError, match=rf"{name}: the file is missing"):
        load_quantized(saved)


def test_a_missing_manifest_is_named_as_such(saved):
    (saved / saving.CONFIG_NAME).unlink()
    with pytest.raises(ModelLoadError, match=rf"not a saved quantcompose model \(no {saving.CONFIG_NAME}\)"):
        load_quantized(saved)


def test_a_manifest_that_is_not_json_is_refused(saved):
    (saved / saving.CONFIG_NAME).write_bytes(b"\x00\xffnot json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_quantized(saved)


# ------------------------------------------------------------ shards (format 3) and format 2
def test_one_shard_per_decoder_layer_and_one_for_the_rest(w4a4, saved):
    manifest = _manifest(saved)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(manifest["files"]) == shards and sorted(p.name for p in saved.iterdir()) == [*shards, saving.CONFIG_NAME]
    places = manifest["weight_files"]
    for name in manifest["tensors"]:
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        assert places["tensors"][name] == shards[int(layer) if layer else 2], name
    # A layer's transforms lie in its own shard, beside the linears that run them.
    for name, layer in manifest["quantized_layers"].items():
        if layer["transform"] is not None:
            holders = {f for t, f in places["transform_tensors"].items() if t.startswith(f"{layer['transform']}.")}
            assert holders == {places["tensors"][f"{name}.weight_codes"]}
    for shard in shards:
        assert manifest["files"][shard]["size"] == (saved / shard).stat().st_size


def test_a_shard_holding_another_layers_tensors_is_refused_even_when_the_hashes_agree(saved):
    first, second = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"
    (saved / first).write_bytes((saved / second).read_bytes())
    with pytest.raises(ModelLoadError, match=rf"{first}: field size|{first}: field sha256"):
        load_quantized(saved)
    data = (saved / first).read_bytes()
    _edit_manifest(saved, lambda m: m["files"].__setitem__(first, {"sha256": saving._file_digest(data),
                                                                    "size": len(data)}), rechecksum=True)
    with pytest.raises(ModelLoadError, match=rf"{first}: tensors \['model.layers.0.*are missing and "
                                             r"\['model.layers.1.*unexpected"):
        load_quantized(saved)


def test_a_tensor_the_shard_map_leaves_out_is_refused(saved):
    _edit_manifest(saved, lambda m: m["weight_files"]["tensors"].pop(f"{Q_PROJ}.weight_codes"), rechecksum=True)
    with pytest.raises(ModelLoadError, match="field weight_files.tensors does not place exactly the tensors"):
        load_quantized(saved)


def test_format_3_without_a_shard_map_is_refused(saved):
    _edit_manifest(saved, lambda m: m.pop("weight_files"), rechecksum=True)
    with pytest.raises(ModelLoadError, match="format 3 needs field weight_files"):
        load_quantized(saved)


def _as_format_2(path):
    """Rewrite the saved model at ``path`` as format 2 wrote it: one weights file, one transforms file."""
    manifest = _manifest(path)
    weights, transforms = {}, {}
    for shard in list(manifest["files"]):
        found = saving._split_shard(manifest, shard, load_file(str(path / shard)))
        weights.update(found[0])
        transforms.update(found[1])
        (path / shard).unlink()
    save_file(weights, str(path / saving.WEIGHTS_NAME))
    save_file(transforms, str(path / saving.TRANSFORMS_NAME))

    def edit(m):
        m["format_version"] = 2
        del m["weight_files"]
        m["files"] = {name: file_record(path / name)
                      for name in (saving.WEIGHTS_NAME, saving.TRANSFORMS_NAME)}

    _edit_manifest(path, edit, rechecksum=True)


def test_a_format_2_model_still_loads_to_identical_logits(w4a4, saved):
    _as_format_2(saved)
    assert _manifest(saved)["format_version"] == 2
    tokens = torch.randint(0, 128, (2, 20))
    assert torch.equal(_logits(load_quantized(saved)[0], tokens), _logits(w4a4, tokens))
    (saved / saving.TRANSFORMS_NAME).write_bytes(b"damaged")
    with pytest.raises(ModelLoadError, match=rf"{saving.TRANSFORMS_NAME}: field size"):
        load_quantized(saved)
