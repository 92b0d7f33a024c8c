import pytest

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.contract.score3d import parse_request


def body(**overrides):
    cols = {"nii_image": ["AAAA"], "bbox": [[1, 2, 30, 40]], "key_slice_idx": [5]}
    cols.update(overrides)
    return {"input_data": cols}


def test_defaults():
    (item,) = parse_request(body(), max_items=4)
    assert item.dicom_window is None and item.slice_offset == 0 and item.model is None and item.mask_format == "list"
    assert item.field("bbox") == "input_data.bbox[0]"


def test_several_items_with_optional_nulls():
    items = parse_request(
        body(nii_image=["A", "B"], bbox=[[1, 2, 3, 4]] * 2, key_slice_idx=[1, 2], dicom_window=[None, [-160, 240]], slice_offset=[3, None]),
        max_items=4,
    )
    assert [i.dicom_window for i in items] == [None, (-160.0, 240.0)]
    assert [i.slice_offset for i in items] == [3, 0]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "expected a JSON object"),
        ({}, r"input_data: required field is missing"),
        (body(bbox=[[1, 2, 3]]), r"input_data.bbox\[0\]: expected 4 numbers"),
        (body(bbox=[[1, 2, "x", 4]]), r"input_data.bbox\[0\]\[2\]"),
        (body(bbox=[[1, 2, float("nan"), 4]]), r"input_data.bbox\[0\]\[2\]"),
        (body(key_slice_idx=[5.5]), r"input_data.key_slice_idx\[0\]"),
        (body(dicom_window=[[300, 100]]), r"input_data.dicom_window\[0\]: lower bound 300.0 must be below upper bound 100.0"),
        (body(dicom_window=[[1]]), r"input_data.dicom_window\[0\]: expected 2 numbers"),
        (body(key_slice_idx=[1, 2]), r"input_data.key_slice_idx: has 2 entries but nii_image has 1"),
        (body(nii_image=[]), r"input_data.nii_image"),
        (body(colour=["red"]), r"input_data.colour: unknown field; allowed fields are nii_image, bbox"),
        (body(slice_offset=[-1]), r"input_data.slice_offset\[0\]: must be 0 or more"),
        (body(mask_format=["png"]), r"input_data.mask_format\[0\]"),
        (body(nii_image=[5]), r"input_data.nii_image\[0\]"),
        ({"input_data": {}, "extra": 1}, r"extra: unknown field; allowed fields are input_data"),
    ],
)
def test_errors_name_the_field(payload, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_request(payload, max_items=4)


def test_item_limit():
    with pytest.raises(InvalidRequest, match="MEDSAM2_MAX_ITEMS"):
        parse_request(body(nii_image=["A"] * 3, bbox=[[1, 2, 3, 4]] * 3, key_slice_idx=[1] * 3), max_items=2)


def test_nii_image_may_be_omitted_when_every_item_names_a_volume_id():
    (item,) = parse_request({"input_data": {"volume_id": ["abc"], "bbox": [[1, 2, 3, 4]], "key_slice_idx": [0]}}, max_items=4)
    assert item.image is None and item.volume_id == "abc"
    with pytest.raises(InvalidRequest, match=r"input_data: give nii_image or volume_id"):
        parse_request({"input_data": {"bbox": [[1, 2, 3, 4]], "key_slice_idx": [0]}}, max_items=4)
    with pytest.raises(InvalidRequest, match=r"input_data.nii_image\[1\]: required \(or give input_data.volume_id\[1\]"):
        parse_request({"input_data": {"volume_id": ["abc", None], "bbox": [[1, 2, 3, 4]] * 2, "key_slice_idx": [0, 0]}},
                      max_items=4)
