"""A workdir on Cloud Storage (`gs://`), through a local GCS emulator.

gcp-storage-emulator serves the Cloud Storage JSON API on 127.0.0.1 from
memory; epath (through fsspec/gcsfs, `EPATH_USE_TF=false`:
TensorFlow's GCS client has no endpoint setting) and TensorStore (Orbax's
arrays) talk to it as to Cloud Storage. train.py, evaluate.py and sample.py run
with their workdir and outputs there, from an empty working directory with an
empty HOME and TMPDIR: a writer that bypassed the filesystem layer would leave a
file in one of them (or a `gs:` directory) and fail the test.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from etils import epath
from etils.epath import backend, gpath
from PIL import Image

from ddpm_jax.runtime import metrics_writer, storage
from ddpm_jax.training import checkpointing
from tests.loop_test import _assert_bitwise_equal
from tests.support.train_helpers import (REPO, read_events, restored_state, run_train_py,
                                 subprocess_env, tiny_config)

BUCKET = "ddpm-test"
STEPS = 4


def _add_generation_headers() -> None:
    """The emulator's media downloads lack Cloud Storage's `x-goog-generation` header, from
    which TensorStore takes the generation of its conditional writes (OCDBT manifests):
    add it (and `x-goog-metageneration`), as Cloud Storage sends them."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects
    original = objects.download
    if getattr(original, "adds_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
        except NotFound:
            pass  # the original answers 404
        return original(request, response, storage, *args, **kwargs)

    download.adds_generation = True
    objects.download = download  # objects.get(alt=media) calls it by this name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is original:
                handlers[method] = download


@pytest.fixture(scope="module")
def gcs_emulator():
    """An in-memory Cloud Storage emulator with one bucket; its environment variables are set
    in this process (for reading back) and returned for subprocesses."""
    from gcp_storage_emulator.server import create_server
    _add_generation_headers()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"EPATH_USE_TF": "false",  # epath through gcsfs, which takes the emulator's URL
           "STORAGE_EMULATOR_HOST": url,  # gcsfs
           "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore (Orbax's arrays)
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credentials lookup
           # gcsfs's zonal-bucket probe asks the real control plane for credentials
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    gpath._is_tf_installed.cache_clear()  # epath caches its EPATH_USE_TF choice
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
        gpath._is_tf_installed.cache_clear()
        server.stop()


def _forget_listings() -> None:
    """Drop this process's cached listings of the bucket (gcsfs caches them): a subprocess
    has changed it."""
    backend.fsspec_backend.fs(f"gs://{BUCKET}").invalidate_cache()


def _run(script, args, env, cwd, timeout=300) -> str:
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:]
    _forget_listings()
    return result.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_training_evaluation_and_sampling_in_a_gs_workdir(fashion_mnist_dirs, gcs_emulator,
                                                          tmp_path):
    workdir = f"gs://{BUCKET}/runs/tiny"
    remote = epath.Path(workdir)
    local = {name: tmp_path / name for name in ("cwd", "home", "tmp")}
    for directory in local.values():
        directory.mkdir()
    env = {**subprocess_env(), **gcs_emulator, "HOME": str(local["home"]),
           "TMPDIR": str(local["tmp"])}
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=STEPS,
                         training__log_every=2, training__checkpoint_every=2,
                         training__sample_every=4)

    first = run_train_py(config, workdir, env, cwd=local["cwd"])
    assert first.returncode == 0, first.stdout[-3000:]
    _forget_listings()
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["2", "4"]
    uninterrupted, _ = restored_state(workdir, config)
    # The newest checkpoint is damaged: the same command skips it, moves it aside, resumes
    # from step 2 and saves step 4 again, bitwise the checkpoint it replaces.
    victim = max((p for p in storage.files_under(remote / "checkpoints" / "4").values()
                  if p.name != checkpointing.MANIFEST), key=lambda p: p.stat().length)
    victim.write_bytes(victim.read_bytes()[:10])
    second = run_train_py(config, workdir, env, cwd=local["cwd"])
    assert second.returncode == 0, second.stdout[-3000:]
    _forget_listings()
    assert f"resuming from step 2 to {STEPS}" in second.stdout
    moved = [p.name for p in (remote / checkpointing.UNREADABLE_SUBDIR).iterdir()]
    assert len(moved) == 1 and moved[0].startswith("4-")
    state, step = restored_state(workdir, config)
    assert step == STEPS
    _assert_bitwise_equal(state, uninterrupted)

    _run("evaluate.py", [f"--workdir={workdir}", "--bpd_images=2", "--bpd_batch_size=2"],
         env, local["cwd"])
    out = f"gs://{BUCKET}/out"
    _run("sample.py", [f"--workdir={workdir}", "--num_images=4", "--sampler=ddim",
                       "--ddim_steps=2", f"--output={out}/grid.png", f"--gif={out}/anim.gif",
                       "--gif_images=2", f"--save_npz={out}/samples.npz"], env, local["cwd"])

    # Nothing reached the local disk: every writer went through the filesystem layer.
    for name, directory in local.items():
        assert sorted(os.listdir(directory)) == [], f"{name} was written to"

    files = sorted(storage.files_under(remote))
    for step in (2, 4):
        assert f"checkpoints/{step}/{checkpointing.MANIFEST}" in files
    for name in ("metrics.jsonl", f"samples/step_{STEPS:07d}.png", f"eval/step_{STEPS}.json",
                 "eval/metrics.jsonl"):
        assert name in files, files
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
    assert any(f.startswith("eval/tensorboard/events.out.tfevents.") for f in files)

    rows = metrics_writer.read_metrics(workdir)
    assert [r["step"] for r in rows] == [2, 4]

    # TensorBoard finds every scalar of both runs and the sample grids.
    scalars, images = read_events(remote / "tensorboard", tmp_path / "events")
    for row in rows:
        for tag, value in row.items():
            if tag != "step" and value is not None:
                assert scalars[tag][row["step"]] == pytest.approx(value, rel=1e-6), tag
    assert set(images["samples"]) == {STEPS}
    eval_scalars, _ = read_events(remote / "eval" / "tensorboard", tmp_path / "eval_events")
    eval_row = metrics_writer.read_metrics(f"{workdir}/eval")[0]
    assert eval_row["step"] == STEPS and eval_row["eval/bpd"] > 0
    assert eval_scalars["eval/bpd"][STEPS] == pytest.approx(eval_row["eval/bpd"], rel=1e-6)

    grid = Image.open(epath.Path(out, "grid.png").open("rb"))
    assert grid.size == (2 * 30 + 2, 2 * 30 + 2)
    assert Image.open(epath.Path(out, "anim.gif").open("rb")).n_frames >= 2
    with epath.Path(out, "samples.npz").open("rb") as f, np.load(f) as npz:
        assert npz["images"].shape == (4, 28, 28, 1)


def test_an_image_folder_in_a_bucket_reads_as_on_disk(gcs_emulator, tmp_path):
    """config.data.folder = gs://...: the same images, order and class labels as a local copy."""
    from ddpm_jax.data import datasets
    rng = np.random.default_rng(0)
    local, remote = tmp_path / "images", epath.Path(f"gs://{BUCKET}/images")
    for name in ("b/2.png", "a/1.png", "a/sub/3.png", "a-z/4.png", "notes.txt"):
        data = (rng.integers(0, 256, (30, 20, 3), dtype=np.uint8) if name.endswith(".png")
                else None)
        for root in (local, remote):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                (root / name).write_text("not an image")
            else:
                storage.write_encoded(root / name, lambda f: Image.fromarray(data).save(
                    f, format="PNG"))
    on_disk, _ = datasets.load_folder(local, 16, 1)
    in_bucket, _ = datasets.load_folder(str(remote), 16, 1)
    np.testing.assert_array_equal(in_bucket, on_disk)
    names = [str(p.relative_to(remote)) for p in datasets.image_paths(str(remote))]
    assert names == ["a/1.png", "a/sub/3.png", "a-z/4.png", "b/2.png"]  # pathlib's order
    assert datasets.folder_classes(str(remote)) == ["a", "a-z", "b"]
    paths = datasets.image_paths(str(remote))
    assert datasets.folder_labels(str(remote), paths).tolist() == [0, 0, 1, 2]
