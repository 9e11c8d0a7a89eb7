"""The detection core without Django: training (and cancelling) a real tiny YOLO, tiling, size limits."""

import struct
import zlib

import pytest
import torch
from PIL import Image

from hemoweb.ml import detect as ml
from hemoweb.ml.sources import BadImage

from .conftest import REPO

SHIPPED = REPO / "models" / "detector" / "bccd-yolov8n.safetensors"


@pytest.fixture(scope="module")
def demo_annotations():
    return ml.read_voc(REPO / "demo" / "bccd")


@pytest.fixture(scope="module")
def shipped():
    return ml.load_detector(SHIPPED)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width×height pixels (header and an empty data chunk): tiny on disk, huge if decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_train_one_epoch_writes_safetensors_and_card_only(tmp_path, demo_annotations):
    torch.set_num_threads(1)
    seen = []
    output = tmp_path / "out" / "tiny.safetensors"
    path, card = ml.train_detector(demo_annotations.images, demo_annotations.classes, output,
                                   ml.TrainConfig(epochs=1, imgsz=64, batch=4), tmp_path / "work",
                                   progress=lambda epoch, total, metrics: seen.append((epoch, total, metrics)))
    assert path == output and output.is_file() and output.with_suffix(".json").is_file()
    assert [(e, t) for e, t, _ in seen] == [(1, 1)] and "map50" in seen[0][2]
    assert card.classes == ["Platelets", "RBC", "WBC"] and card.architecture == "yolov8n.yaml" and card.imgsz == 64
    assert set(card.metrics["val"]) >= {"map50", "map50_95", "precision", "recall", "per_class"}
    # ultralytics' pickled .pt files lived only in the run folder, which is gone.
    assert not list(tmp_path.rglob("*.pt")) and not list((tmp_path / "work").iterdir())
    detector = ml.load_detector(output)
    found = ml.detect(detector, Image.open(demo_annotations.images[0].path), conf=0.0001)
    assert found.width == 640 and found.height == 480
    assert found.boxes, "at a confidence floor of 0.0001 even a one-epoch detector proposes boxes"
    assert {box.label for box in found.boxes} <= set(card.classes)
    # Fine-tuning starts from those safetensors (a pickled .pt is refused).
    again, tuned = ml.train_detector(demo_annotations.images, demo_annotations.classes, tmp_path / "tuned.safetensors",
                                     ml.TrainConfig(architecture=str(output), epochs=1, imgsz=64, batch=4),
                                     tmp_path / "work")
    assert tuned.architecture == "yolov8n.yaml" and tuned.training["start"] == "tiny.safetensors"
    tuned_detector = ml.load_detector(again)  # the tuned network has the shape of one built for its classes
    assert ml.detect(tuned_detector, Image.open(demo_annotations.images[0].path), conf=0.0001).width == 640
    with pytest.raises(ml.DetectionError, match="does not unpickle"):
        ml.train_detector(demo_annotations.images, demo_annotations.classes, tmp_path / "x.safetensors",
                          ml.TrainConfig(architecture=str(tmp_path / "yolov8n.pt"), epochs=1), tmp_path / "work")


def test_cancelled_training_writes_nothing(tmp_path, demo_annotations):
    torch.set_num_threads(1)
    output = tmp_path / "out" / "never.safetensors"
    with pytest.raises(ml.TrainingCancelled):
        ml.train_detector(demo_annotations.images, demo_annotations.classes, output,
                          ml.TrainConfig(epochs=3, imgsz=64, batch=4), tmp_path / "work", should_stop=lambda: True)
    assert not output.exists() and not output.with_suffix(".json").exists()
    assert not list((tmp_path / "work").iterdir())


def test_merge_tiles_drops_cut_copies_and_duplicates():
    # One cell at x 600..700 seen whole by the right tile (x0=480) and cut at the left tile's edge (x1=640).
    left = torch.tensor([[600.0, 100, 640, 180, 0.9, 2]])
    right = torch.tensor([[120.0, 100, 220, 180, 0.8, 2], [10.0, 10, 50, 50, 0.7, 1]])
    # The same small cell (x 500..540) inside the overlap is found by both tiles.
    left_dup = torch.tensor([[500.0, 300, 540, 340, 0.6, 1]])
    right_dup = torch.tensor([[20.0, 301, 60, 341, 0.5, 1]])
    merged = ml.merge_tiles([((0, 0, 640, 480), torch.cat([left, left_dup])),
                             ((480, 0, 1120, 480), torch.cat([right, right_dup]))], 1120, 480, iou=0.5)
    as_tuples = sorted((round(r[0].item()), round(r[5].item())) for r in merged)
    assert as_tuples == [(490, 1), (500, 1), (600, 2)]


def test_plan_tiles_cover_the_image_with_overlap():
    tiles = ml.plan_tiles(2000, 1000, 640, 160)
    assert tiles[0] == (0, 0, 640, 640) and tiles[-1] == (1360, 360, 2000, 1000)
    covered = torch.zeros(1000, 2000, dtype=torch.bool)
    for x0, y0, x1, y1 in tiles:
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    huge = tmp_path / "scan.png"
    huge.write_bytes(_png_header_only(20_000, 20_000))
    assert huge.stat().st_size < 200
    with pytest.raises(ml.ImageTooLarge, match="400,000,000 pixels; the limit is 40,000,000 pixels"):
        ml.load_image(huge, max_pixels=40_000_000)
    with pytest.raises(BadImage, match="not an image"):
        ml.load_image(b"%PDF-1.4 not a picture")


def test_shipped_detector_finds_the_white_cell_on_a_test_smear(shipped):
    card = shipped.card
    assert card.classes == ["Platelets", "RBC", "WBC"] and SHIPPED.stat().st_size < 15 * 1024**2
    smear = Image.open(REPO / "demo" / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00007.jpg")  # a test-split image
    found = ml.detect(shipped, smear)
    counts = found.counts(card.classes)
    assert counts["WBC"] == 1 and counts["RBC"] >= 5
    wbc = next(box for box in found.boxes if box.label == "WBC")
    truth = ml.read_voc(REPO / "demo" / "bccd").images
    true_wbc = next(b for im in truth if im.name == "BloodImage_00007.jpg" for b in im.boxes if b.label == "WBC")
    iou = ml._box_iou(torch.tensor([[wbc.x1, wbc.y1, wbc.x2, wbc.y2]]),
                      torch.tensor([[true_wbc.x1, true_wbc.y1, true_wbc.x2, true_wbc.y2]])).item()
    assert iou > 0.6
    crop = ml.crop_cells(smear, [wbc])[0]
    assert abs(crop.width - crop.height) <= 2 and crop.width > wbc.width


def test_evaluation_lists_sure_boxes_the_annotation_lacks(shipped, demo_annotations):
    import dataclasses

    smear = next(im for im in demo_annotations.images if im.name == "BloodImage_00007.jpg")
    complete = ml.evaluate(shipped, [smear])
    assert not [box for box in complete["unmatched_sure"] if box["label"] == "WBC"]
    # the same smear with its white cell's box left out, as some BCCD images are
    unlabelled = dataclasses.replace(smear, boxes=[b for b in smear.boxes if b.label != "WBC"])
    missing = ml.evaluate(shipped, [unlabelled])
    wbc = [box for box in missing["unmatched_sure"] if box["label"] == "WBC"]
    assert len(wbc) == 1 and wbc[0]["image"] == "BloodImage_00007.jpg" and wbc[0]["score"] >= 0.5
    assert missing["per_class"]["RBC"] == complete["per_class"]["RBC"]


def test_large_field_is_tiled_and_merged(shipped):
    smear = Image.open(REPO / "demo" / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00007.jpg")
    single = ml.detect(shipped, smear).counts(shipped.card.classes)["WBC"]
    field = Image.new("RGB", (3 * 640, 3 * 480))
    for row in range(3):
        for column in range(3):
            field.paste(smear, (column * 640, row * 480))
    found = ml.detect(shipped, field)
    assert found.tiles > 1
    wbcs = [b for b in found.boxes if b.label == "WBC"]
    assert len(wbcs) == 9 * single
    boxes = torch.tensor([[b.x1, b.y1, b.x2, b.y2] for b in wbcs])
    overlaps = ml._box_iou(boxes, boxes).fill_diagonal_(0)
    assert overlaps.max() < 0.3  # every white cell once, not once per tile
