"""Data parallel and FSDP on 8 simulated CPU devices (a subprocess: JAX fixes its device
count at start-up, and the rest of the suite runs on one device)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from jaxgpt.errors import UserError
from jaxgpt.parallel import mesh_dims, param_spec


@pytest.fixture(scope="module")
def report():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice_worker.py")],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


@pytest.mark.slow  # reads the 8-device worker process's report
def test_dp_and_fsdp_give_the_single_device_losses(report):
    assert report["devices"] == 8
    ref = np.array(report["steps"]["dp1"]["losses"])
    assert len(ref) == 10 and ref[-1] < ref[0]
    for name, run in report["steps"].items():
        np.testing.assert_allclose(run["losses"], ref, rtol=1e-5, err_msg=name)


@pytest.mark.slow  # reads the 8-device worker process's report
def test_fsdp_really_shards_parameters_and_optimizer_state(report):
    steps = report["steps"]
    for n in (2, 8):
        fsdp, dp = steps[f"fsdp{n}"], steps[f"dp{n}"]
        assert dp["max_bytes_per_device"] == dp["total_bytes"]  # dp: every device holds everything
        # each device holds about 1/n of the state (scalars such as the step are replicated)
        assert fsdp["max_bytes_per_device"] <= fsdp["total_bytes"] / n * 1.05 + 64, (n, fsdp)
        assert all("fsdp" in spec for spec in fsdp["param_specs"].values()), fsdp["param_specs"]
        assert all("fsdp" not in spec for spec in dp["param_specs"].values())
    hybrid = steps["hybrid2x4"]  # 2-way data x 4-way fsdp: parameters split 4 ways
    assert hybrid["max_bytes_per_device"] <= hybrid["total_bytes"] / 4 * 1.05 + 64


@pytest.mark.slow  # reads the 8-device worker process's report
def test_lora_on_fsdp_gives_the_single_device_losses(report):
    """LoRA's frozen base is sharded like parameters; the adapters train the same on any mesh."""
    one, fsdp = report["lora"]["one"], report["lora"]["fsdp4"]
    assert one["losses"][-1] < one["losses"][0]
    np.testing.assert_allclose(fsdp["losses"], one["losses"], rtol=1e-5)
    assert all("fsdp" in spec for spec in fsdp["param_specs"].values())  # the frozen base is split too


@pytest.mark.slow  # reads the 8-device worker process's report
def test_train_py_path_on_4_devices_reproduces_single_device_val_loss(report):
    one = report["val_one"]
    assert len(one) == 3  # iters 0, 10, 20
    np.testing.assert_allclose(report["val_dp4"], one, rtol=1e-5)
    np.testing.assert_allclose(report["val_fsdp4"], one, rtol=1e-5)


@pytest.mark.slow  # reads the 8-device worker process's report
def test_memmap_batches_on_a_2x2_mesh_reproduce_single_device_val_loss(report):
    """The host path for corpora too big for the devices (memmap, prefetch, each device's rows read
    on the host) gives the batches, so the losses, of the device-resident path on one device."""
    assert report["memmap_prefetched"]
    np.testing.assert_allclose(report["val_memmap_2x2"], report["val_one"], rtol=1e-5)


@pytest.mark.slow  # reads the 8-device worker process's report
def test_fsdp_checkpoint_resumes_on_other_meshes(report):
    # fsdp on 4 devices to iter 10, then 1 device to 15, then dp on 2 to 20
    resumed = report["val_resumed"]
    assert len(resumed) == 4  # evaluations at iters 0, 10 (fsdp x4), 15 (one device), 20 (dp x2)
    np.testing.assert_allclose([resumed[0], resumed[1], resumed[3]], report["val_one"], rtol=1e-5)


def test_mesh_shapes_and_specs():
    assert mesh_dims("dp", "", 8) == (8, 1) and mesh_dims("fsdp", "", 8) == (1, 8)
    assert mesh_dims("fsdp", "2x4", 8) == (2, 4) and mesh_dims("dp", "4", 8) == (4, 1)
    assert tuple(param_spec((65, 128), 4)) == (None, 'fsdp')
    assert tuple(param_spec((384, 128), 4)) == ('fsdp', None)
    assert tuple(param_spec((7,), 4)) == ()
    for args, msg in [(("dp", "2x4", 8), "use --sharding=fsdp"), (("dp", "16", 8), "16 devices"),
                      (("fsdp", "two", 8), "mesh_shape must look like")]:
        with pytest.raises(UserError, match=msg):
            mesh_dims(*args)
