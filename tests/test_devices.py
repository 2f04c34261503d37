"""The member axis sharded over several devices: one device's results up to float rounding, and
the same bits for the same device count. Run in a subprocess with four host devices (XLA reads the
device count when JAX starts), so that the rest of the suite keeps its one device."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import os, re, sys
    flags = re.sub(r"--xla_force_host_platform_device_count=\\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=4"
    import jax
    import numpy as np
    jax.config.update("jax_enable_x64", True)
    from creditscape import model as M
    from creditscape.devices import MemberSharding
    from creditscape.rules import get_rule
    from creditscape.tasks import get_task, make_splits
    from creditscape import train as training
    from creditscape.train import Checkpoint, CurvatureProbe, TrainConfig, to_device, train_ensemble

    assert len(jax.local_devices()) == 4
    task = get_task("cue_recall", delay=3)
    s = make_splits(task, 64, 64, seed=0)
    cfg = M.ModelConfig(task.n_in, 8, task.n_out, rec_noise=0.05, dale_exc_fraction=0.75)
    tcfg = TrainConfig(optimizer="adam", learning_rate=0.01, steps=40, eval_every=10, batch_size=8)
    probe = CurvatureProbe(batch=to_device(jax.tree.map(lambda a: a[:16], s.train)), steps=6)
    sets = {"train": s.train, "test": s.test}

    def train(devices, rule="mdgl", checkpoint=None, seeds=(5, 6, 7), probe=probe):
        return train_ensemble(cfg, get_rule(rule), tcfg, seeds, s.train, sets, learning_rates=[0.01, 0.02, 0.01][:len(seeds)],
                              probe=probe, keep_trajectory=True, progress=False, devices=devices,
                              checkpoint=checkpoint)

    def same(a, b, exact=False):
        # wall times, and how many evaluations a run read back from a checkpoint
        a, b = (r._replace(eval_seconds=None, restored_evaluations=None) for r in (a, b))
        if not exact and "lambda_max" in b.evals:  # a converged Lanczos residual ‖Hv₁ − λ₁v₁‖ is rounding on λ's scale
            scale = np.nanmax(np.abs(b.evals["lambda_max"]))
            np.testing.assert_allclose(a.evals["lambda_residual"], b.evals["lambda_residual"], rtol=1e-5, atol=1e-5 * scale)
            a, b = (r._replace(evals={k: v for k, v in r.evals.items() if k != "lambda_residual"}) for r in (a, b))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x), np.asarray(y)
            if exact or not np.issubdtype(x.dtype, np.floating):
                np.testing.assert_array_equal(x, y)
            else:  # XLA compiles a partitioned program's elementwise code differently (see docs/scale.md);
                # Lanczos residuals are rounding-level numbers, hence a tolerance scaled by each array
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4 * np.nanmax(np.abs(y), initial=0.0))

    one = train(1)
    assert np.all(np.isfinite(one.evals["lambda_max"])) and one.losses.shape == (3, 40)
    four = train(4)  # one padding member
    assert all(a.sharding.device_set == {jax.local_devices()[0]} for a in jax.tree.leaves(four.params))
    same(four, one)
    same(train(4), four, exact=True)  # the same device count: the same bits
    same(train(3), one)  # no padding
    # A checkpoint written on one device resumes on four (it holds the real members only).
    ckpt = Checkpoint(sys.argv[1], every_seconds=0.0)
    same(train(1, checkpoint=ckpt), one, exact=True)  # leaves the checkpoint of iteration 30
    resumed = train(4, checkpoint=ckpt)
    assert resumed.restored_evaluations == 4  # iterations 0, 10, 20 and 30
    same(resumed, one)
    # Devices beyond the members split each member's minibatch where the rule's estimate is a batch
    # mean and each part holds enough work (MIN_PART_WORK, lifted here for this tiny network).
    n_steps = s.train.x.shape[1]
    assert training.batch_parts(cfg, get_rule("mdgl"), tcfg, n_steps, 4) == 1
    training.MIN_PART_WORK = 0
    assert [training.batch_parts(cfg, get_rule(r), tcfg, n_steps, k)
            for r, k in [("mdgl", 4), ("mdgl", 3), ("mdgl", 1), ("modprop", 4)]] == [4, 2, 1, 1]
    assert MemberSharding(4, 2, 2).mesh.shape == {"members": 2, "batch": 2}
    try:
        MemberSharding(4, 3, 2)
    except ValueError as err:
        assert "need more than 4 devices" in str(err), err
    else:
        raise AssertionError("6 devices' layout accepted on 4")
    splits, chunk_of = [], training.make_chunk  # (the layout each training compiles its chunk for)
    training.make_chunk = lambda *args: (splits.append(args[3].batch_split), chunk_of(*args))[1]
    # (the training chunk is what differs: measured without the probe's Lanczos, cheaper to compile)
    alone = train(1, seeds=[5, 6], probe=None)
    split = train(4, seeds=[5, 6], probe=None)  # members over 2 devices, each one's minibatch over 2
    same(split, alone)
    same(train(4, seeds=[5, 6], probe=None), split, exact=True)
    assert splits == [1, 2, 2], splits
    try:
        train(5)
    except ValueError as err:
        assert "devices = 5, but this machine has 4" in str(err), err
    else:
        raise AssertionError("five devices accepted")
    print("ok")
""")


def test_members_sharded_over_four_devices_agree_with_one_device(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt.npz")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
