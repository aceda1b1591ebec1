"""The student pixel cache (data/pixels.py): exact, resumable, refused when stale, fork-safe."""
import ctypes
import multiprocessing
import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cache import store
from cache import pixel_cache
from data import pixels
from data.images import BadImage, ReplayImages, load_image
from data.views import PARAM_NAMES, InputSpec, render, sample_views

P = {name: i for i, name in enumerate(PARAM_NAMES)}
SPEC = InputSpec(size=40, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))
N_VIEWS = 5


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                     (xx + yy) * 127 / max(width + height - 2, 1)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, size=base.shape), 0, 255).astype(np.uint8), "RGB")


IMAGES = {  # PNG and JPEG, square and non-square, and a grayscale PNG
    "a/png_square.png": ((64, 64), {}),
    "a/png_wide.png": ((97, 61), {}),
    "b/jpeg_square.jpg": ((80, 80), {"quality": 90}),
    "b/jpeg_tall.jpg": ((53, 90), {"quality": 85}),
    "b/jpeg_wide.jpeg": ((131, 101), {"quality": 92}),
}


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "ds"
    paths = []
    for i, (rel, (size, kwargs)) in enumerate(IMAGES.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        noise_image(*size, seed=i).save(root / rel, **kwargs)
        paths.append(rel)
    params = np.stack([sample_views(rel, *IMAGES[rel][0], N_VIEWS, seed=3) for rel in paths])
    # make sure every operation shows up: a flip, a grayscale, strong jitter
    params[0, 1, P["flip"]] = 1
    params[1, 2, P["grayscale"]] = 1
    params[2, 3, P["flip"]], params[2, 3, P["grayscale"]] = 1, 1
    return root, paths, params


def build(path, source, **kwargs):
    root, paths, params = source
    return pixels.build(path, root, paths, params, SPEC, source=pixel_cache.source_identity(params, "fp"),
                        block=2, **kwargs)


def wanted(source, form="raw", fingerprint="fp"):
    _, paths, params = source
    return pixel_cache.identity(SPEC, len(paths), N_VIEWS, pixel_cache.source_identity(params, fingerprint), form)


# ------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("form", pixel_cache.EXACT_FORMS)
def test_cached_pixels_equal_replay_after_normalisation(source, tmp_path, form):
    root, paths, params = source
    path = tmp_path / "pixels.h5"
    summary = build(path, source, form=form, workers=2 if form == "raw" else 0)  # rendered in workers, too
    assert summary["complete"] and summary["failed_now"] == []
    replay = ReplayImages(root, paths, params, SPEC)
    dataset = pixels.PixelImages(path, wanted(source, form))
    assert len(dataset) == len(replay) and dataset.n_views == N_VIEWS
    for row in range(len(paths)):
        for view in range(N_VIEWS):  # view 0 (eval view) included
            item = row * N_VIEWS + view
            got_item, cached = dataset[item]
            assert got_item == item and cached.dtype == torch.uint8 and cached.shape == (40, 40, 3)
            expected = replay[item][1]
            assert torch.equal(pixels.normalise(cached[None], SPEC)[0], expected), (paths[row], view)
            assert np.array_equal(cached.numpy(), SPEC.resize(replay.view(row, view)))
    # and the bytes in the file are the rendered views, readable with plain h5py
    if form == "raw":
        with h5py.File(path) as f:
            image = load_image(root / paths[2])
            assert np.array_equal(f["pixels"][2, 3], SPEC.resize(render(image, params[2, 3])))


def test_render_row_decodes_once_and_matches_per_view_replay(source, monkeypatch):
    root, paths, params = source
    calls = []
    real = pixels.load_image
    monkeypatch.setattr(pixels, "load_image", lambda p: calls.append(p) or real(p))
    out = pixels.render_row(root / paths[3], params[3], SPEC)
    assert len(calls) == 1 and out.shape == (N_VIEWS, 40, 40, 3) and out.dtype == np.uint8
    replay = ReplayImages(root, paths, params, SPEC)
    for view in range(N_VIEWS):
        assert np.array_equal(out[view], SPEC.resize(replay.view(3, view)))


def test_normalise_is_bit_identical_to_input_spec_for_every_byte():
    spec = InputSpec(size=16, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    batch[0].reshape(-1)[:256] = np.arange(256)  # every byte value, in every channel
    batch[0].reshape(-1)[256:512] = np.arange(256)[::-1]
    batch[0].reshape(-1)[512:768] = (np.arange(256) * 7) % 256
    out = pixels.normalise(torch.from_numpy(batch), spec)
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32 and out.is_contiguous()
    for i in range(4):
        assert torch.equal(out[i], spec(Image.fromarray(batch[i], "RGB")))
    # the device path (a gather from the same table), run here on the CPU; and on CUDA when present
    gathered = pixels._gather(torch.from_numpy(batch), pixels.lookup_table(spec))
    assert torch.equal(gathered, out) and gathered.is_contiguous(memory_format=torch.channels_last)
    if torch.cuda.is_available():
        assert torch.equal(pixels.normalise(torch.from_numpy(batch), spec, device="cuda").cpu(), out)
    # resize is the uint8 half of __call__
    image = noise_image(30, 20)
    assert torch.equal(pixels.normalise(torch.from_numpy(np.array(spec.resize(image)))[None], spec)[0], spec(image))


# ------------------------------------------------------------------------------ resume

def _file_datasets(path):
    with h5py.File(path) as f:
        return {name: f[name][()] for name in f}


def test_resume_after_kill_gives_the_same_bytes(source, tmp_path):
    reference = tmp_path / "reference.h5"
    build(reference, source)
    killed = tmp_path / "killed.h5"

    def run_and_die():
        blocks = []

        def progress(rows):
            blocks.append(rows)
            if len(blocks) == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-run, as kill -9 would
        build(killed, source, progress=progress)

    child = multiprocessing.get_context("fork").Process(target=run_and_die)
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    status = store.read(killed, "status")
    assert list(status) == [1, 1, 1, 1, 0]  # blocks of 2 rows: two done, the last pending
    # a block that was being written when killed: data half-written, status still pending
    with h5py.File(killed, "r+") as f:
        f["pixels"][4] = 7
    summary = build(killed, source)
    assert summary["rendered_now"] == 1 and summary["complete"]
    got, expected = _file_datasets(killed), _file_datasets(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
    assert killed.read_bytes() == reference.read_bytes()


def test_compressed_form_resumes_from_finished_blocks(source, tmp_path):
    class StopAfterFirst:
        requested = True

    path = tmp_path / "pixels.h5"
    first = build(path, source, form="webp", stop=StopAfterFirst())
    assert not first["complete"] and not path.exists() and first["rendered_now"] == 2
    parts = sorted(p.name for p in (tmp_path / "pixels.h5.parts").iterdir())
    assert parts == ["identity.json", "rows0000000000.npz"]
    root, paths, params = source
    second = pixels.build(path, root, paths, params, SPEC, source=pixel_cache.source_identity(params, "fp"), block=4,
                          form="webp")  # another block size: the recorded one is kept
    assert second["complete"] and second["rendered_now"] == 3 and not (tmp_path / "pixels.h5.parts").exists()
    reference = tmp_path / "reference.h5"
    build(reference, source, form="webp")
    got, expected = _file_datasets(path), _file_datasets(reference)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name


# ------------------------------------------------------------------------------ stale

def test_stale_cache_is_refused_and_force_rebuilds(source, tmp_path):
    root, paths, params = source
    path = tmp_path / "pixels.h5"
    build(path, source)
    other = params.copy()
    other[1, 1, P["flip"]] = 1 - other[1, 1, P["flip"]]
    with pytest.raises(pixel_cache.StalePixels, match="source"):
        pixels.build(path, root, paths, other, SPEC, source=pixel_cache.source_identity(other, "fp"), block=2)
    with pytest.raises(pixel_cache.StalePixels, match="size"):
        pixels.build(path, root, paths, params, InputSpec(32, SPEC.mean, SPEC.std),
                     source=pixel_cache.source_identity(params, "fp"), block=2)
    with pytest.raises(pixel_cache.StalePixels, match="source"):
        pixels.PixelImages(path, wanted(source, fingerprint="another dataset"))
    with pytest.raises(pixel_cache.StalePixels, match="form"):
        pixel_cache.check(path, wanted(source, form="webp"))
    pixel_cache.check(path, wanted(source))  # the right one passes
    summary = pixels.build(path, root, paths, other, SPEC, source=pixel_cache.source_identity(other, "fp"), block=2,
                           force=True)
    assert summary["complete"] and summary["rendered_now"] == len(paths)
    image = load_image(root / paths[1])
    assert np.array_equal(pixel_cache.PixelReader(path).read([1], [1])[0], SPEC.resize(render(image, other[1, 1])))


def test_mean_and_std_are_not_part_of_the_identity(source):
    _, paths, params = source
    a = pixel_cache.identity(SPEC, 5, N_VIEWS, pixel_cache.source_identity(params, "fp"))
    b = pixel_cache.identity(InputSpec(40, (0.5,) * 3, (0.5,) * 3), 5, N_VIEWS, pixel_cache.source_identity(params, "fp"))
    assert pixel_cache.mismatches(a, b) == []
    assert pixel_cache.spec_key(SPEC) == "40px-bicubic"


def test_failed_rows_are_marked_and_never_served(source, tmp_path):
    root, paths, params = source
    (root / paths[2]).write_bytes(b"not an image")
    path = tmp_path / "pixels.h5"
    summary = build(path, source, row_ok=np.array([True, False, True, True, True]))
    assert [f["row"] for f in summary["failed_now"]] == [1, 2]
    assert summary["failed_now"][0]["reason"] == "not extracted"
    assert list(store.read(path, "status")) == [1, 2, 2, 1, 1]
    reader = pixel_cache.PixelReader(path)
    assert reader.read([0, 3], [1, 2]).shape == (2, 40, 40, 3)
    with pytest.raises(BadImage, match=r"rows \[2\]"):
        reader.read([0, 2], [1, 1])
    info = pixel_cache.describe(path)
    assert (info["done"], info["failed"], info["pending"]) == (3, 2, 0)


# ------------------------------------------------------------------------------ reading

def test_reader_opens_lazily_and_works_in_two_dataloader_workers(source, tmp_path):
    path = tmp_path / "pixels.h5"
    build(path, source)
    dataset = pixels.PixelImages(path)
    assert dataset.reader._fd is None and h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == 0  # nothing open before fork
    direct = torch.stack([dataset[i][1] for i in range(len(dataset))])  # opens in this process...
    assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == 0  # ...with a file descriptor, not an HDF5 handle
    batches = [[3, 17, 0, 24], [9, 1], [20, 21, 22], [5]]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=2,
                                         multiprocessing_context="fork")
    seen = 0
    for batch, (items, px) in zip(batches, loader):
        assert items.tolist() == batch and px.dtype == torch.uint8 and px.shape == (len(batch), 40, 40, 3)
        assert torch.equal(px, direct[batch])
        seen += 1
    assert seen == len(batches)


def test_batch_read_matches_single_reads_and_checks_bounds(source, tmp_path):
    path = tmp_path / "pixels.h5"
    build(path, source)
    reader = pixel_cache.PixelReader(path)
    rows, views = np.array([4, 0, 4, 2]), np.array([0, 3, 4, 4])
    batch = reader.read(rows, views)
    for i in range(4):
        assert np.array_equal(batch[i], reader.read([rows[i]], [views[i]])[0])
    with pytest.raises(IndexError):
        reader.read([5], [0])
    with pytest.raises(IndexError):
        reader.read([0], [N_VIEWS])


def test_compressed_form_is_lossless_and_smaller(source, tmp_path):
    raw, webp = tmp_path / "raw.h5", tmp_path / "webp.h5"
    build(raw, source)
    build(webp, source, form="webp")
    n = len(source[1])
    a = pixel_cache.PixelReader(raw).read(np.repeat(np.arange(n), N_VIEWS), np.tile(np.arange(N_VIEWS), n))
    b = pixel_cache.PixelReader(webp).read(np.repeat(np.arange(n), N_VIEWS), np.tile(np.arange(N_VIEWS), n))
    assert np.array_equal(a, b)  # lossless: identical pixels, so the form does not change training
    assert pixel_cache.describe(raw)["bytes"] >= n * N_VIEWS * 40 * 40 * 3
    assert pixel_cache.describe(webp)["bytes"] < pixel_cache.describe(raw)["bytes"]
    assert pixel_cache.describe(webp)["form"] == "webp"


def test_the_lossy_form_is_close_smaller_and_checked(source, tmp_path):
    raw, jpeg = tmp_path / "raw.h5", tmp_path / "jpeg.h5"
    build(raw, source)
    build(jpeg, source, form="jpeg")
    n = len(source[1])
    rows, views = np.repeat(np.arange(n), N_VIEWS), np.tile(np.arange(N_VIEWS), n)
    exact = pixel_cache.PixelReader(raw).read(rows, views).astype(np.float64)
    lossy = pixel_cache.PixelReader(jpeg).read(rows, views).astype(np.float64)
    assert not np.array_equal(exact, lossy)  # re-encoded ...
    assert 10 * np.log10(255 ** 2 / ((exact - lossy) ** 2).mean()) > 28  # ... but close (PSNR in dB)
    assert pixel_cache.describe(jpeg)["bytes"] < pixel_cache.describe(raw)["bytes"] / 2
    with h5py.File(jpeg, "r") as f:  # damage in one stored JPEG is found on read
        offset = f["data"].id.get_offset() + int(f["offsets"][N_VIEWS + 1]) + 20
    with open(jpeg, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(pixel_cache.DamagedPixels) as found:
        pixel_cache.PixelReader(jpeg).read(rows, views)
    assert found.value.rows == [1]


def test_thread_batches_equal_dataloader_batches_and_stop_early(source, tmp_path):
    path = tmp_path / "pixels.h5"
    build(path, source)
    dataset = pixels.PixelImages(path)
    batches = [[3, 17, 0, 24], [9, 1], [20, 21, 22], [5], [7, 8]]
    expected = list(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=0))
    got = list(pixels.PixelBatches(dataset, batches, prefetch=1))
    assert len(got) == len(expected) == len(pixels.PixelBatches(dataset, batches))
    for (items, px), (want_items, want_px) in zip(got, expected):
        assert torch.equal(items, want_items) and torch.equal(px, want_px) and px.dtype == torch.uint8
    iterator = iter(pixels.PixelBatches(dataset, batches, prefetch=1))
    next(iterator)
    iterator.close()  # leaving early stops the reading thread
    with pytest.raises(IndexError):  # errors in the thread reach the consumer
        list(pixels.PixelBatches(dataset, [[0], [10_000]]))


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fixed_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at 128 kB, so every batch buffer is mapped and unmapped on its
    own: the dynamic threshold would otherwise move freed batches into a heap arena whose resident
    size drifts by a few MB, which says nothing about what the reader keeps."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_reading_every_row_does_not_grow_resident_memory(tmp_path):
    """A 25 MB cache read end to end: after the first batches (thread set-up), resident memory
    stays flat while the remaining 18 MB are read, so nothing read is kept."""
    if not _fixed_mmap_threshold():
        pytest.skip("needs glibc")
    n, k, s = 2000, 4, 32
    path = tmp_path / "pixels.h5"
    wanted = pixel_cache.identity(InputSpec(s, (0.5,) * 3, (0.5,) * 3), n, k, {"dataset_fingerprint": "x"})
    out = pixel_cache.RawWriter(path, n, k, s, pixel_cache._attrs(wanted, 500), [])
    rng = np.random.default_rng(0)
    with out.opened():
        for start in range(0, n, 500):
            out.write(list(range(start, start + 500)),
                      torch.from_numpy(rng.integers(0, 256, (500, k, s, s, 3), dtype=np.uint8)), [""] * 500)
    probe = store.read(path, "pixels")[1234, 3]
    dataset = pixels.PixelImages(path, wanted)
    batches = [list(range(i, i + 200)) for i in range(0, n * k, 200)]
    warm, checksum = None, 0
    for j, (items, px) in enumerate(pixels.PixelBatches(dataset, batches)):
        checksum += int(px[:, 0, 0, 0].sum())
        if j == 10:
            warm = _resident_bytes()
    growth = _resident_bytes() - warm
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MB while reading 18 MB of pixels"
    assert np.array_equal(dataset[1234 * k + 3][1].numpy(), probe)


def test_student_features_decode_each_image_once_and_match_replay(run_copy, monkeypatch):
    """The features stage renders all K views from one decode, and gets exactly the features that
    replaying view by view gives."""
    from conftest import ALIGN, invoke
    import data.images
    from stages.student import create_backbone

    decodes = {"n": 0}
    real = data.images.load_image

    def counted(path):
        decodes["n"] += 1
        return real(path)

    monkeypatch.setattr(data.images, "load_image", counted)
    monkeypatch.setattr(pixels, "load_image", counted)
    assert invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN).exit_code == 0
    status = store.read(run_copy / "extract" / "teacher.h5", "status")
    assert decodes["n"] == int((status == store.DONE).sum())  # not once per view
    monkeypatch.setattr(data.images, "load_image", real)
    features = store.read(next((run_copy / "features").glob("*/features.h5")), "features")
    view_params = store.read(run_copy / "extract" / "teacher.h5", "view_params")
    from stages.runfolder import RunFolder
    index = RunFolder(run_copy).load_index()
    backbone, spec = create_backbone("test_resnet", "none", 32)
    replay = ReplayImages(index.root, index.paths, view_params, spec)
    rendered = pixels.RenderedRows(index.root, index.paths, view_params, spec)
    for row in (0, 17, 40):  # the very tensors replay gives, view by view
        views = pixels.normalise(rendered[row][1], spec)
        assert torch.equal(views, torch.stack([replay[row * 3 + k][1] for k in range(3)]))
    items = [0, 4, 17, 3 * 40 + 2]
    with torch.inference_mode():
        expected = backbone.eval()(torch.stack([replay[i][1] for i in items])).numpy()
    # the same inputs; only the batch they ran in differs (float rounding of the convolutions)
    assert np.allclose(features.reshape(-1, features.shape[-1])[items], expected, rtol=1e-3, atol=1e-3)
